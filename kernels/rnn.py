"""Triton kernels of the fused recurrence, forward and BPTT backward, in three forms of one step
(h_{t-1} @ W_hh^T + projected input + image term, tanh/relu, lengths mask):

* persistent form: ONE launch for all T steps; each program owns 16 batch rows and the full hidden
  row, loads W_hh once before the time loop and carries h in registers between steps. Chosen
  wherever W_hh fits on chip: hidden <= 256 in 16-bit dtypes, <= 128 in float32 (beyond that
  Triton's shared memory for the loaded W_hh exceeds a Hopper SM's 227 KB).
* cooperative form: ONE launch for all T steps; the [B, H] state is split in [block_b, block_n]
  tiles over at most one program per SM (all resident at once: a cooperative launch where Triton
  offers it), each step reads h_{t-1} from L2 and a grid barrier (an atomic counter) separates the
  steps. Chosen for every size the persistent form cannot hold.
* step form: one launch per time step, grid over (batch tiles, hidden tiles), the same tile code
  as the cooperative form. The host loop allocates nothing and never syncs, so the whole sequence
  can be captured in one CUDA graph. Only on request (launch-bound otherwise).

Contract (time-major; see mmrnn_ext/reference.py): rnn_forward -> out [T, B, H];
rnn_backward -> (dA [T, B, H], dh0 [B, H]). Dots accumulate in float32. For float32 inputs the
dots use TF32 only where the user allowed TF32 to torch (torch.backends.cudnn.allow_tf32, which
nn.RNN follows through cuDNN, or torch.backends.cuda.matmul.allow_tf32), with the operands rounded
to TF32 first; otherwise float32 accuracy (see _fp32_dot). The form is chosen by size;
MMRNN_TRITON_FORM=persistent|cooperative|step (or form=...) overrides it. The tile choices were
measured on an H100 (bench/NOTES.md, bench/results/gpu_h100_sweep.json).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

FORMS = ("auto", "step", "persistent", "cooperative")
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _tanh(a):
    # |a| < 0.4: Taylor series to a^13 (truncation < 4e-9 relative); else 1 - 2 / (exp(2a) + 1),
    # which saturates cleanly to +-1 (exp overflows to inf, or underflows to 0).
    a2 = a * a
    p = 21844.0 / 6081075.0
    p = p * a2 - 1382.0 / 155925.0
    p = p * a2 + 62.0 / 2835.0
    p = p * a2 - 17.0 / 315.0
    p = p * a2 + 2.0 / 15.0
    p = p * a2 - 1.0 / 3.0
    small = a + a * a2 * p
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    return tl.where(tl.abs(a) < 0.4, small, big)


@triton.jit
def _activation(a, RELU: tl.constexpr, FAST_TANH: tl.constexpr):
    if RELU:
        return tl.where(a < 0.0, 0.0, a)  # NaN passes through, as torch.relu
    elif FAST_TANH:  # the GPU's tanh.approx.f32 (max relative error ~2^-11), for 16-bit outputs only
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [a], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return _tanh(a)


@triton.jit
def _activation_grad_from_output(h, RELU: tl.constexpr):
    if RELU:
        return tl.where(h > 0.0, 1.0, 0.0)
    else:
        return 1.0 - h * h


@triton.jit
def _round_tf32(x):
    """float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), kept in float32.
    The tensor cores read a float32 operand's top 19 bits, i.e. truncate it; rounding first halves
    the error and removes its bias (cuBLAS and cuDNN round too). NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b, accumulated in float32. b is always W_hh (or its transpose).
    16-bit operands: tensor cores. float32 operands by FP32_DOT: "ieee" full precision; "tf32"
    (TF32 allowed): a is rounded to TF32 here and b arrives rounded (the launcher rounds W_hh once),
    so the tensor cores' truncation of the low bits is exact; "tf32x3": Triton's three-pass TF32
    split, about float32's accuracy on tensor cores."""
    if DOT_FP32:  # exact: a bf16 x bf16 product is representable in float32
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        if FP32_DOT == "tf32":
            return tl.dot(_round_tf32(a), b, acc, input_precision="tf32")
        return tl.dot(a, b, acc, input_precision=FP32_DOT)
    return tl.dot(a, b, acc)


@triton.jit
def _lens_of(len_ptr, rb, mb, T, BLOCK_B: tl.constexpr, HAS_LEN: tl.constexpr):
    """The rows' lengths (T for every row without lengths)."""
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, dtype=tl.int32)
    return lens


@triton.jit
def _fwd_tile(h_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, t, B, H, pid_b, pid_n,
              HAS_IMG: tl.constexpr, HAS_LEN: tl.constexpr, RELU: tl.constexpr,
              FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr, FAST_TANH: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out_t[b, n] = f(sum_k h_prev[b, k] W[n, k] + xp_t[b, n] + img[b, n]) for the tile
    (pid_b, pid_n) of [BLOCK_B, BLOCK_N]. xp_ptr, img_ptr (per step) and out_ptr point at step t's
    [B, H] slice. h_prev is read through L2 (.cg): another program may have written it this launch."""
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mb, mn = rb < B, rn < H
    offs = rb[:, None] * H + rn[None, :]
    m = mb[:, None] & mn[None, :]
    # the addends do not depend on h_prev: their loads go first, off the step's critical path
    acc = tl.load(xp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_IMG:
        acc += tl.load(img_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        a = tl.load(h_prev_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                    cache_modifier=".cg")
        wt = tl.load(w_ptr + rn[None, :] * H + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _dot(a, wt, acc, FP32_DOT, DOT_FP32)
    h = _activation(acc, RELU, FAST_TANH)
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
        h = tl.where((t < lens)[:, None], h, 0.0)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_tile(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_ptr, len_ptr, dst_ptr, t, T, B, H, pid_b, pid_n,
              HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr, FINAL: tl.constexpr, RELU: tl.constexpr,
              FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One reverse step of BPTT for the tile (pid_b, pid_n) of [BLOCK_B, BLOCK_N]:
        g = dA_{t+1} @ W_hh           (dL/dh_t from step t+1; absent at the last step)
        g = ghl where t == len - 1    (a row's h_last is h_{len-1}: its gradient enters there)
        dA_t = (dY_t + g) * f'(h_t), zero where t >= len
    FINAL (t = -1): writes dh0 = g instead (ghl for rows of length 0). dA_{t+1} is read through L2."""
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mb, mn = rb < B, rn < H
    offs = rb[:, None] * H + rn[None, :]
    m = mb[:, None] & mn[None, :]
    # everything but dA_{t+1} is loaded first, off the step's critical path
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    enters = (t == lens - 1)[:, None]  # rows whose h_last is h_t: only they read grad_h_last
    ghl = tl.load(ghl_ptr + offs, mask=m & enters, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)  # (FINAL: step 0's, unused)
    gy = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_NEXT:
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < H
            d = tl.load(d_next_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                        cache_modifier=".cg")
            w = tl.load(w_ptr + rk[:, None] * H + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            g = _dot(d, w, g, FP32_DOT, DOT_FP32)
    g = tl.where(enters, ghl, g)
    if FINAL:
        tl.store(dst_ptr + offs, g.to(dst_ptr.dtype.element_ty), mask=m)
    else:
        d = (gy + g) * _activation_grad_from_output(h, RELU)
        d = tl.where((t < lens)[:, None], d, 0.0)
        tl.store(dst_ptr + offs, d.to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["t"])
def rnn_fwd_step_kernel(h_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, t, B, H,
                        HAS_IMG: tl.constexpr, HAS_LEN: tl.constexpr, RELU: tl.constexpr,
                        FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr, FAST_TANH: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step form, forward: one launch per step, one tile per program."""
    _fwd_tile(h_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, t, B, H, tl.program_id(0), tl.program_id(1),
              HAS_IMG, HAS_LEN, RELU, FP32_DOT, DOT_FP32, FAST_TANH, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["t"])
def rnn_bwd_step_kernel(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_ptr, len_ptr, dst_ptr, t, T, B, H,
                        HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr, FINAL: tl.constexpr, RELU: tl.constexpr,
                        FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step form, backward: one launch per reverse step, one tile per program."""
    _bwd_tile(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_ptr, len_ptr, dst_ptr, t, T, B, H,
              tl.program_id(0), tl.program_id(1),
              HAS_NEXT, HAS_LEN, FINAL, RELU, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def _grid_barrier(count_ptr, generation):
    """Wait until every program of the launch has arrived here `generation` times (count starts at 0).
    The stores before it are visible to every program after it: the CTA barrier orders this program's
    stores before the release increment; the acquire read orders the loads after. Correct only when
    all programs are resident at once (the launcher caps the grid at the SM count)."""
    tl.debug_barrier()
    target = generation * tl.num_programs(0)
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel") + 1
    while arrived < target:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def rnn_fwd_coop_kernel(xp_ptr, w_ptr, h0_ptr, img_ptr, len_ptr, out_ptr, count_ptr, T, B, H,
                        HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_LEN: tl.constexpr,
                        RELU: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr, FAST_TANH: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cooperative form, forward: ONE launch for all T steps; the [B, H] state is split in tiles
    over all programs (each takes tiles pid, pid + P, ...), h_{t-1} is read from L2 and a grid
    barrier separates the steps."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step = B * H
    for t in range(T):
        h_prev = out_ptr + (t - 1) * step
        if t == 0:
            h_prev = h0_ptr
        img_t = img_ptr
        if IMG_PER_STEP:
            img_t = img_ptr + t * step
        for tile in range(pid, n_tiles, nprog):
            _fwd_tile(h_prev, w_ptr, xp_ptr + t * step, img_t, len_ptr, out_ptr + t * step, t, B, H,
                      tile % n_tb, tile // n_tb,
                      HAS_IMG, HAS_LEN, RELU, FP32_DOT, DOT_FP32, FAST_TANH, BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, t + 1)


@triton.jit
def rnn_bwd_coop_kernel(gy_ptr, ghl_ptr, out_ptr, w_ptr, len_ptr, dA_ptr, dh0_ptr, count_ptr, T, B, H,
                        HAS_LEN: tl.constexpr, RELU: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cooperative form, backward: ONE launch for all T reverse steps and dh0, a grid barrier
    between steps (see rnn_fwd_coop_kernel)."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step = B * H
    last = (T - 1) * step
    for tile in range(pid, n_tiles, nprog):  # step T - 1: nothing flows in from a later step
        _bwd_tile(dA_ptr, w_ptr, gy_ptr + last, ghl_ptr, out_ptr + last, len_ptr, dA_ptr + last, T - 1, T, B, H,
                  tile % n_tb, tile // n_tb,
                  False, HAS_LEN, False, RELU, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
    _grid_barrier(count_ptr, 1)
    for i in range(1, T):
        t = T - 1 - i
        for tile in range(pid, n_tiles, nprog):
            _bwd_tile(dA_ptr + (t + 1) * step, w_ptr, gy_ptr + t * step, ghl_ptr, out_ptr + t * step, len_ptr,
                      dA_ptr + t * step, t, T, B, H, tile % n_tb, tile // n_tb,
                      True, HAS_LEN, False, RELU, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, i + 1)
    for tile in range(pid, n_tiles, nprog):  # dh0 = dA_0 @ W_hh (ghl for rows of length 0)
        _bwd_tile(dA_ptr, w_ptr, gy_ptr, ghl_ptr, out_ptr, len_ptr, dh0_ptr, -1, T, B, H,
                  tile % n_tb, tile // n_tb,
                  True, HAS_LEN, True, RELU, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def _row_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's batch rows x the full hidden row: (rows, hidden, row mask, tile mask, offsets)."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mb, mh = rb < B, rh < H
    return rb, rh, mb, mh, rb[:, None] * H + rh[None, :]


@triton.jit
def rnn_fwd_persistent_kernel(xp_ptr, w_ptr, h0_ptr, img_ptr, len_ptr, out_ptr, T, B, H,
                              HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_LEN: tl.constexpr,
                              RELU: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              FAST_TANH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T steps for one batch tile: W_hh^T loaded once, h carried in registers."""
    rb, rh, mb, mh, offs = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    wt = tl.load(w_ptr + rh[None, :] * H + rh[:, None], mask=mh[:, None] & mh[None, :], other=0.0)  # [K, N] = W^T
    h = tl.load(h0_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    if HAS_IMG:
        img = tl.load(img_ptr + offs, mask=m, other=0.0).to(tl.float32)
    step = B * H
    xp_t, out_t, img_t = xp_ptr, out_ptr, img_ptr
    for t in range(T):
        acc = tl.load(xp_t + offs, mask=m, other=0.0).to(tl.float32)  # loads first: off the h chain
        if HAS_IMG:
            if IMG_PER_STEP:
                acc += tl.load(img_t + offs, mask=m, other=0.0).to(tl.float32)
                img_t += step
            else:
                acc += img
        acc = _dot(h.to(wt.dtype), wt, acc, FP32_DOT, DOT_FP32)
        h_new = _activation(acc, RELU, FAST_TANH)
        if HAS_LEN:
            live = (t < lens)[:, None]
            h = tl.where(live, h_new, h)
            h_new = tl.where(live, h_new, 0.0)
        else:
            h = h_new
        tl.store(out_t + offs, h_new.to(out_ptr.dtype.element_ty), mask=m)
        xp_t += step
        out_t += step


@triton.jit
def rnn_bwd_persistent_kernel(gy_ptr, ghl_ptr, out_ptr, w_ptr, len_ptr, dA_ptr, dh0_ptr, T, B, H,
                              HAS_LEN: tl.constexpr, RELU: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T reverse steps of BPTT for one batch tile: W_hh loaded once, dL/dh carried in registers."""
    rb, rh, mb, mh, offs = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    w = tl.load(w_ptr + rh[:, None] * H + rh[None, :], mask=mh[:, None] & mh[None, :], other=0.0)  # [K, N] = W
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    ghl = tl.load(ghl_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    step = B * H
    last = (T - 1) * step
    gy_t, h_t, dA_t = gy_ptr + last, out_ptr + last, dA_ptr + last
    for i in range(T):
        t = T - 1 - i
        g = tl.where((t == lens - 1)[:, None], ghl, g)
        h = tl.load(h_t + offs, mask=m, other=0.0).to(tl.float32)
        gy = tl.load(gy_t + offs, mask=m, other=0.0).to(tl.float32)
        d = (gy + g) * _activation_grad_from_output(h, RELU)
        d = tl.where((t < lens)[:, None], d, 0.0)
        d_store = d.to(dA_ptr.dtype.element_ty)
        tl.store(dA_t + offs, d_store, mask=m)
        g = _dot(d_store.to(w.dtype), w, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), FP32_DOT, DOT_FP32)
        gy_t -= step
        h_t -= step
        dA_t -= step
    g = tl.where((lens == 0)[:, None], ghl, g)
    tl.store(dh0_ptr + offs, g.to(dh0_ptr.dtype.element_ty), mask=m)


# --- launchers ----------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def allow_tf32(dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """TF32 dots for float32 CUDA tensors only where the user allowed TF32 to torch (as nn.RNN does
    via cuDNN). CPU tensors (Triton's interpreter) have no TF32: full precision."""
    return (dtype == torch.float32 and device_type == "cuda"
            and bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32))


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (ties away from zero), as float32; the same rounding as the
    kernels' _round_tf32. NaN stays NaN."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -8192).view(torch.float32)
    return torch.where(torch.isnan(t), t, rounded)


def _fp32_dot(dtype: torch.dtype, device_type: str, cfg: "Config", B: int, H: int, backward: bool) -> str:
    """How float32 dots run: "tf32" where torch allows TF32; otherwise float32 accuracy either as
    "tf32x3" (Triton's three-pass TF32 split on tensor cores: 2.4-3.5e-7 relative vs float64 at the
    benchmark shapes, no worse than FMA's 2.4-6.9e-7, and 1.1-4.7x faster in the forward) or "ieee"
    (FMA), which the backward keeps below 64x256 outputs per step, where it measured faster
    (bench/NOTES.md)."""
    if dtype != torch.float32:
        return "ieee"  # unused: 16-bit operands
    if allow_tf32(dtype, device_type):
        return "tf32"
    if cfg.fp32_dot:
        return cfg.fp32_dot
    if device_type != "cuda":
        return "ieee"
    return "ieee" if backward and B * H < 64 * 256 else "tf32x3"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET, Triton's interpreter (3.9) multiplies the raw uint16 bits of bfloat16
    dot operands; upcasting them to float32 first computes the same exact products."""
    return dtype == torch.bfloat16 and _interpreting()


def fast_tanh(dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """tanh.approx.f32 (relative error ~2^-11, under the 2^-8 of a bfloat16 and the 2^-11 of a
    float16 output rounding) for 16-bit outputs on a GPU; float32 keeps the exact tanh."""
    return dtype in (torch.bfloat16, torch.float16) and device_type == "cuda" and not _interpreting()


def persistent_fits(H: int, dtype: torch.dtype, gates: int = 1) -> bool:
    """Whether W_hh ([gates * H, H]) fits on chip for the persistent form: gates * Hp^2 elements
    (Hp = H padded to a power of two) within the RNN's measured bound, 256^2 in 16-bit dtypes and
    128^2 in float32 (see the module docstring). LSTM (4 gates): hidden <= 128 in 16-bit dtypes,
    <= 64 in float32; GRU (3 gates) the same."""
    hp = max(_MIN_DOT, triton.next_power_of_2(H))
    return gates * hp * hp <= (128 * 128 if dtype == torch.float32 else 256 * 256)


def choose_form(H: int, dtype: torch.dtype, form: str | None = None, gates: int = 1) -> str:
    """auto: persistent wherever W_hh fits on chip (one program per batch tile runs the whole chain
    with no grid barrier: faster than the cooperative form at every such size measured,
    bench/NOTES.md), else cooperative. step only on request. gates: 1 (RNN), 4 (LSTM), 3 (GRU)."""
    form = form or os.environ.get("MMRNN_TRITON_FORM", "auto")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} (or MMRNN_TRITON_FORM unset), got {form!r}")
    if form == "auto":
        return "persistent" if persistent_fits(H, dtype, gates) else "cooperative"
    return form


class Config(NamedTuple):
    """Tile of a form: [block_b, block_n] outputs per program (persistent: block_n = the padded
    hidden row), K loop of block_k; fast_tanh: None = by dtype and device (see fast_tanh)."""
    block_b: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    fast_tanh: bool | None = None
    fp32_dot: str | None = None  # float32 with TF32 off: None (by size, see _fp32_dot), "ieee" or "tf32x3"


def _resident_programs(device: torch.device) -> int:
    """How many programs of the cooperative form may run at once: one per SM on a GPU; one under
    Triton's interpreter, which runs programs one after another (a grid barrier would never open)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(B: int, H: int, dtype: torch.dtype, device: torch.device, form: str) -> Config:
    """The tiles the sweep on an H100 chose (bench/NOTES.md, bench/results/gpu_h100_sweep.json)."""
    hp = max(_MIN_DOT, triton.next_power_of_2(H))
    if form == "persistent":  # 4 warps: faster than 8 at hidden 128 and 256 in both passes
        return Config(_MIN_DOT, hp, hp, 4)
    block_k = min(64 if dtype == torch.float32 else 128, hp)  # fewer, longer dots per step
    if form == "step":
        return Config(_MIN_DOT, min(64, hp), block_k)
    # cooperative: the smallest tiles whose count still fits the resident programs
    slots = _resident_programs(device)
    block_b = max(_MIN_DOT, min(64, triton.next_power_of_2(B)))
    n_tb = triton.cdiv(B, block_b)
    block_n, widest = _MIN_DOT, min(128, hp)
    while block_n < widest and n_tb * triton.cdiv(H, block_n) > slots:
        block_n *= 2
    return Config(block_b, block_n, block_k)


@functools.lru_cache(maxsize=None)
def _cooperative_launch_supported() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__


def _launch_options(device: torch.device) -> dict:
    """The cooperative form asks the driver for a cooperative launch where this Triton offers it: the
    launch then fails, rather than hangs, if its programs could not all be resident at once."""
    return {"launch_cooperative_grid": True} if device.type == "cuda" and _cooperative_launch_supported() else {}


def _grid(cfg: Config, B: int, H: int, device: torch.device, form: str):
    tiles_b, tiles_n = triton.cdiv(B, cfg.block_b), triton.cdiv(H, cfg.block_n)
    if form == "step":
        return (tiles_b, tiles_n)
    return (min(tiles_b * tiles_n, _resident_programs(device)),)


def _check_int32_offsets(t: torch.Tensor) -> None:
    if t.numel() >= 2 ** 31:
        raise ValueError(f"xp: the Triton kernels index with 32-bit offsets; got {t.numel()} elements (>= 2**31)")


def rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity, form=None, config=None):
    """-> out [T, B, H]. Inputs contiguous, on one device, of one dtype (the op layer ensures it).
    form / config override the choice by size (tuning scripts and tests)."""
    T, B, H = xp.shape
    out = torch.empty_like(xp)
    if T == 0 or B == 0:
        return out
    _check_int32_offsets(xp)
    dev = xp.device.type
    relu, dot32 = nonlinearity == "relu", dot_in_fp32(xp.dtype)
    has_img, has_len = image_term is not None, lengths is not None
    per_step = has_img and image_term.dim() == 3
    img = image_term if has_img else xp  # never read when absent
    lens = lengths if has_len else xp
    form = choose_form(H, xp.dtype, form)
    cfg = config or default_config(B, H, xp.dtype, xp.device, form)
    tanh_approx = fast_tanh(xp.dtype, dev) if cfg.fast_tanh is None else cfg.fast_tanh
    fp32_dot = _fp32_dot(xp.dtype, dev, cfg, B, H, backward=False)
    if fp32_dot == "tf32":
        w_hh = round_tf32(w_hh)
    flags = dict(HAS_IMG=has_img, HAS_LEN=has_len, RELU=relu, FP32_DOT=fp32_dot, DOT_FP32=dot32, FAST_TANH=tanh_approx)
    if form == "persistent":
        rnn_fwd_persistent_kernel[(triton.cdiv(B, cfg.block_b),)](
            xp, w_hh, h0, img, lens, out, T, B, H, IMG_PER_STEP=per_step, **flags,
            BLOCK_B=cfg.block_b, BLOCK_H=max(_MIN_DOT, triton.next_power_of_2(H)), num_warps=cfg.num_warps)
        return out
    grid = _grid(cfg, B, H, xp.device, form)
    blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=xp.device)
        rnn_fwd_coop_kernel[grid](xp, w_hh, h0, img, lens, out, count, T, B, H, IMG_PER_STEP=per_step,
                                  **flags, **blocks, **_launch_options(xp.device))
        return out
    for t in range(T):
        rnn_fwd_step_kernel[grid](
            h0 if t == 0 else out[t - 1], w_hh, xp[t], img[t] if per_step else img, lens, out[t], t, B, H,
            **flags, **blocks)
    return out


def rnn_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, form=None, config=None):
    """-> (dA [T, B, H], dh0 [B, H])."""
    T, B, H = out.shape
    dA = torch.empty_like(out)
    dh0 = torch.empty_like(h0)
    if B == 0:
        return dA, dh0
    if T == 0:
        return dA, grad_h_last.clone()
    _check_int32_offsets(out)
    relu, dot32 = nonlinearity == "relu", dot_in_fp32(out.dtype)
    has_len = lengths is not None
    lens = lengths if has_len else out
    form = choose_form(H, out.dtype, form)
    cfg = config or default_config(B, H, out.dtype, out.device, form)
    fp32_dot = _fp32_dot(out.dtype, out.device.type, cfg, B, H, backward=True)
    if fp32_dot == "tf32":
        w_hh = round_tf32(w_hh)
    flags = dict(HAS_LEN=has_len, RELU=relu, FP32_DOT=fp32_dot, DOT_FP32=dot32)
    if form == "persistent":
        rnn_bwd_persistent_kernel[(triton.cdiv(B, cfg.block_b),)](
            grad_out, grad_h_last, out, w_hh, lens, dA, dh0, T, B, H, **flags,
            BLOCK_B=cfg.block_b, BLOCK_H=max(_MIN_DOT, triton.next_power_of_2(H)), num_warps=cfg.num_warps)
        return dA, dh0
    grid = _grid(cfg, B, H, out.device, form)
    blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=out.device)
        rnn_bwd_coop_kernel[grid](grad_out, grad_h_last, out, w_hh, lens, dA, dh0, count, T, B, H,
                                  **flags, **blocks, **_launch_options(out.device))
        return dA, dh0
    for t in range(T - 1, -1, -1):
        rnn_bwd_step_kernel[grid](
            dA[t + 1] if t + 1 < T else dA[t], w_hh, grad_out[t], grad_h_last, out[t], lens, dA[t], t, T, B, H,
            HAS_NEXT=t + 1 < T, FINAL=False, **flags, **blocks)
    rnn_bwd_step_kernel[grid](
        dA[0], w_hh, grad_out[0], grad_h_last, out[0], lens, dh0, -1, T, B, H,
        HAS_NEXT=True, FINAL=True, **flags, **blocks)
    return dA, dh0
