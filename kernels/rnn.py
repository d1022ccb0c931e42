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
MMRNN_TRITON_FORM=persistent|cooperative|step (or form=...) overrides it. The size rule, tiles and
TF32 policy are kernels/launch.py's, the dot, tanh and grid barrier kernels/common.py's (the LSTM's
and GRU's kernels share both).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _dot, _grid_barrier, _lens_of, _row_tile, _tanh
from .launch import fast_tanh, plan


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


# --- launchers -----------------------------------------------------------------------------------

def rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity, form=None, config=None):
    """-> out [T, B, H]. Inputs contiguous, on one device, of one dtype (the op layer ensures it).
    form / config override the choice by size (tuning scripts and tests)."""
    T, B, H = xp.shape
    out = torch.empty_like(xp)
    if T == 0 or B == 0:
        return out
    run = plan(xp, B, H, w_hh, form, config, backward=False)
    has_img, has_len = image_term is not None, lengths is not None
    per_step = has_img and image_term.dim() == 3
    img, lens = (image_term if has_img else xp), (lengths if has_len else xp)  # never read when absent
    tanh_approx = fast_tanh(xp.dtype, xp.device.type) if run.config.fast_tanh is None else run.config.fast_tanh
    flags = dict(run.flags, HAS_IMG=has_img, HAS_LEN=has_len, RELU=nonlinearity == "relu", FAST_TANH=tanh_approx)
    w, grid, blocks = run.w_hh, run.grid, run.blocks
    if run.form == "persistent":
        rnn_fwd_persistent_kernel[grid](xp, w, h0, img, lens, out, T, B, H, IMG_PER_STEP=per_step, **flags, **blocks)
        return out
    if run.form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=xp.device)
        rnn_fwd_coop_kernel[grid](xp, w, h0, img, lens, out, count, T, B, H, IMG_PER_STEP=per_step, **flags, **blocks)
        return out
    for t in range(T):
        rnn_fwd_step_kernel[grid](h0 if t == 0 else out[t - 1], w, xp[t], img[t] if per_step else img, lens, out[t],
                                  t, B, H, **flags, **blocks)
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
    run = plan(out, B, H, w_hh, form, config, backward=True)
    has_len = lengths is not None
    lens = lengths if has_len else out
    flags = dict(run.flags, HAS_LEN=has_len, RELU=nonlinearity == "relu")
    w, grid, blocks = run.w_hh, run.grid, run.blocks
    if run.form == "persistent":
        rnn_bwd_persistent_kernel[grid](grad_out, grad_h_last, out, w, lens, dA, dh0, T, B, H, **flags, **blocks)
        return dA, dh0
    if run.form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=out.device)
        rnn_bwd_coop_kernel[grid](grad_out, grad_h_last, out, w, lens, dA, dh0, count, T, B, H, **flags, **blocks)
        return dA, dh0
    for t in range(T - 1, -1, -1):
        rnn_bwd_step_kernel[grid](dA[t + 1] if t + 1 < T else dA[t], w, grad_out[t], grad_h_last, out[t], lens, dA[t],
                                  t, T, B, H, HAS_NEXT=t + 1 < T, FINAL=False, **flags, **blocks)
    rnn_bwd_step_kernel[grid](dA[0], w, grad_out[0], grad_h_last, out[0], lens, dh0, -1, T, B, H,
                              HAS_NEXT=True, FINAL=True, **flags, **blocks)
    return dA, dh0
