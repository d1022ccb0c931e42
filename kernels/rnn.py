"""Triton kernels of the fused recurrence, forward and BPTT backward, in two forms:

* step form: one launch per time step, grid over (batch tiles, hidden tiles); each program does
  its tile of h_{t-1} @ W_hh^T, adds the projected input and image term, applies the nonlinearity
  and the lengths mask, and writes h_t. The host loop allocates nothing and never syncs, so the
  whole sequence can be captured in one CUDA graph.
* persistent form: ONE launch for all T steps; each program owns a batch tile and the full hidden
  row, loads W_hh once before the time loop and carries h on chip between steps. Chosen when W_hh
  fits on chip: hidden <= 256 in 16-bit dtypes, <= 128 in float32 (beyond that Triton's shared
  memory for the loaded W_hh exceeds a Hopper SM's 227 KB).

Contract (time-major; see mmrnn_ext/reference.py): rnn_forward -> out [T, B, H];
rnn_backward -> (dA [T, B, H], dh0 [B, H]). Dots accumulate in float32. For float32 inputs the
dots use TF32 only where the user allowed TF32 to torch (torch.backends.cudnn.allow_tf32, which
nn.RNN follows through cuDNN, or torch.backends.cuda.matmul.allow_tf32); otherwise full precision.
The form is chosen by size; MMRNN_TRITON_FORM=step|persistent (or form=...) overrides it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FORMS = ("auto", "step", "persistent")
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
def _activation(a, RELU: tl.constexpr):
    if RELU:
        return tl.where(a < 0.0, 0.0, a)  # NaN passes through, as torch.relu
    else:
        return _tanh(a)


@triton.jit
def _activation_grad_from_output(h, RELU: tl.constexpr):
    if RELU:
        return tl.where(h > 0.0, 1.0, 0.0)
    else:
        return 1.0 - h * h


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # exact: a bf16 x bf16 product is representable in float32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:  # float32 operands, TF32 not allowed: full-precision dot
        return tl.dot(a, b, acc, input_precision="ieee")
    else:  # 16-bit operands (tensor cores), or float32 where TF32 is allowed
        return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit(do_not_specialize=["t"])
def rnn_fwd_step_kernel(h_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, t, B, H,
                        HAS_IMG: tl.constexpr, HAS_LEN: tl.constexpr, RELU: tl.constexpr,
                        IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out_t[b, n] = f(sum_k h_prev[b, k] W[n, k] + xp_t[b, n] + img[b, n]) for one [BLOCK_B, BLOCK_N] tile.
    xp_ptr, img_ptr (per step) and out_ptr point at step t's [B, H] slice."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mb, mn = rb < B, rn < H
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        a = tl.load(h_prev_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :] * H + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _dot(a, wt, acc, IEEE, DOT_FP32)
    offs = rb[:, None] * H + rn[None, :]
    m = mb[:, None] & mn[None, :]
    acc += tl.load(xp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_IMG:
        acc += tl.load(img_ptr + offs, mask=m, other=0.0).to(tl.float32)
    h = _activation(acc, RELU)
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
        h = tl.where((t < lens)[:, None], h, 0.0)
    tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["t"])
def rnn_bwd_step_kernel(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_ptr, len_ptr, dst_ptr, t, T, B, H,
                        HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr, FINAL: tl.constexpr, RELU: tl.constexpr,
                        IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One reverse step of BPTT for a [BLOCK_B, BLOCK_N] tile:
        g = dA_{t+1} @ W_hh           (dL/dh_t from step t+1; absent at the last step)
        g = ghl where t == len - 1    (a row's h_last is h_{len-1}: its gradient enters there)
        dA_t = (dY_t + g) * f'(h_t), zero where t >= len
    FINAL (t = -1): writes dh0 = g instead (ghl for rows of length 0)."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mb, mn = rb < B, rn < H
    g = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_NEXT:
        for k0 in range(0, H, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < H
            d = tl.load(d_next_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
            w = tl.load(w_ptr + rk[:, None] * H + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            g = _dot(d, w, g, IEEE, DOT_FP32)
    offs = rb[:, None] * H + rn[None, :]
    m = mb[:, None] & mn[None, :]
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, dtype=tl.int32)
    ghl = tl.load(ghl_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.where((t == lens - 1)[:, None], ghl, g)
    if FINAL:
        tl.store(dst_ptr + offs, g.to(dst_ptr.dtype.element_ty), mask=m)
    else:
        h = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        d = (gy + g) * _activation_grad_from_output(h, RELU)
        d = tl.where((t < lens)[:, None], d, 0.0)
        tl.store(dst_ptr + offs, d.to(dst_ptr.dtype.element_ty), mask=m)


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
                              RELU: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
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
        acc = _dot(h.to(wt.dtype), wt, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), IEEE, DOT_FP32)
        acc += tl.load(xp_t + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_IMG:
            if IMG_PER_STEP:
                acc += tl.load(img_t + offs, mask=m, other=0.0).to(tl.float32)
                img_t += step
            else:
                acc += img
        h_new = _activation(acc, RELU)
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
                              HAS_LEN: tl.constexpr, RELU: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T reverse steps of BPTT for one batch tile: W_hh loaded once, dL/dh carried in registers."""
    rb, rh, mb, mh, offs = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    w = tl.load(w_ptr + rh[:, None] * H + rh[None, :], mask=mh[:, None] & mh[None, :], other=0.0)  # [K, N] = W
    if HAS_LEN:
        lens = tl.load(len_ptr + rb, mask=mb, other=0)
    else:
        lens = tl.full((BLOCK_B,), T, dtype=tl.int32)
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
        g = _dot(d_store.to(w.dtype), w, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), IEEE, DOT_FP32)
        gy_t -= step
        h_t -= step
        dA_t -= step
    g = tl.where((lens == 0)[:, None], ghl, g)
    tl.store(dh0_ptr + offs, g.to(dh0_ptr.dtype.element_ty), mask=m)


# --- launchers ----------------------------------------------------------------------------------

def allow_tf32(dtype: torch.dtype) -> bool:
    """TF32 dots for float32 only where the user allowed TF32 to torch (as nn.RNN does via cuDNN)."""
    return dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def ieee_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not allow_tf32(dtype)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Under TRITON_INTERPRET, Triton's interpreter (3.9) multiplies the raw uint16 bits of bfloat16
    dot operands; upcasting them to float32 first computes the same exact products."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def persistent_fits(H: int, dtype: torch.dtype) -> bool:
    """Whether W_hh fits on chip for the persistent form (see the module docstring)."""
    return triton.next_power_of_2(H) <= (128 if dtype == torch.float32 else 256)


def choose_form(H: int, dtype: torch.dtype, form: str | None = None) -> str:
    form = form or os.environ.get("MMRNN_TRITON_FORM", "auto")
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS} (or MMRNN_TRITON_FORM unset), got {form!r}")
    if form == "auto":
        return "persistent" if persistent_fits(H, dtype) else "step"
    return form


def _step_blocks(H: int):
    block_n = max(_MIN_DOT, min(64, triton.next_power_of_2(H)))
    block_k = max(_MIN_DOT, min(32, triton.next_power_of_2(H)))
    return _MIN_DOT, block_n, block_k


def _check_int32_offsets(t: torch.Tensor) -> None:
    if t.numel() >= 2 ** 31:
        raise ValueError(f"xp: the Triton kernels index with 32-bit offsets; got {t.numel()} elements (>= 2**31)")


def rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity, form=None):
    """-> out [T, B, H]. Inputs contiguous, on one device, of one dtype (the op layer ensures it)."""
    T, B, H = xp.shape
    out = torch.empty_like(xp)
    if T == 0 or B == 0:
        return out
    _check_int32_offsets(xp)
    relu, ieee, dot32 = nonlinearity == "relu", ieee_dot(xp.dtype), dot_in_fp32(xp.dtype)
    has_img, has_len = image_term is not None, lengths is not None
    per_step = has_img and image_term.dim() == 3
    img = image_term if has_img else xp  # never read when absent
    lens = lengths if has_len else xp
    if choose_form(H, xp.dtype, form) == "persistent":
        block_b = _MIN_DOT
        block_h = max(_MIN_DOT, triton.next_power_of_2(H))
        rnn_fwd_persistent_kernel[(triton.cdiv(B, block_b),)](
            xp, w_hh, h0, img, lens, out, T, B, H,
            HAS_IMG=has_img, IMG_PER_STEP=per_step, HAS_LEN=has_len, RELU=relu, IEEE=ieee, DOT_FP32=dot32,
            BLOCK_B=block_b, BLOCK_H=block_h, num_warps=4)
        return out
    block_b, block_n, block_k = _step_blocks(H)
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_n))
    for t in range(T):
        rnn_fwd_step_kernel[grid](
            h0 if t == 0 else out[t - 1], w_hh, xp[t], img[t] if per_step else img, lens, out[t], t, B, H,
            HAS_IMG=has_img, HAS_LEN=has_len, RELU=relu, IEEE=ieee, DOT_FP32=dot32,
            BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def rnn_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, form=None):
    """-> (dA [T, B, H], dh0 [B, H])."""
    T, B, H = out.shape
    dA = torch.empty_like(out)
    dh0 = torch.empty_like(h0)
    if B == 0:
        return dA, dh0
    if T == 0:
        return dA, grad_h_last.clone()
    _check_int32_offsets(out)
    relu, ieee, dot32 = nonlinearity == "relu", ieee_dot(out.dtype), dot_in_fp32(out.dtype)
    has_len = lengths is not None
    lens = lengths if has_len else out
    if choose_form(H, out.dtype, form) == "persistent":
        block_b = _MIN_DOT
        block_h = max(_MIN_DOT, triton.next_power_of_2(H))
        rnn_bwd_persistent_kernel[(triton.cdiv(B, block_b),)](
            grad_out, grad_h_last, out, w_hh, lens, dA, dh0, T, B, H,
            HAS_LEN=has_len, RELU=relu, IEEE=ieee, DOT_FP32=dot32, BLOCK_B=block_b, BLOCK_H=block_h, num_warps=4)
        return dA, dh0
    block_b, block_n, block_k = _step_blocks(H)
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_n))
    common = dict(HAS_LEN=has_len, RELU=relu, IEEE=ieee, DOT_FP32=dot32, BLOCK_B=block_b, BLOCK_N=block_n,
                  BLOCK_K=block_k, num_warps=4)
    for t in range(T - 1, -1, -1):
        rnn_bwd_step_kernel[grid](
            dA[t + 1] if t + 1 < T else dA[t], w_hh, grad_out[t], grad_h_last, out[t], lens, dA[t], t, T, B, H,
            HAS_NEXT=t + 1 < T, FINAL=False, **common)
    rnn_bwd_step_kernel[grid](
        dA[0], w_hh, grad_out[0], grad_h_last, out[0], lens, dh0, -1, T, B, H,
        HAS_NEXT=True, FINAL=True, **common)
    return dA, dh0
