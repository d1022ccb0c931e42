"""The @triton.jit building blocks the three cells' kernels share (kernels/rnn.py, lstm.py, gru.py):
the exact tanh and the sigmoid, TF32 rounding and the one dot every recurrent product goes through,
lengths, the grid barrier of the cooperative form, and the tile and gate-block addressing.
Launch planning (form, tiles, TF32 policy, grid) is host-side, in kernels/launch.py."""
from __future__ import annotations

import triton
import triton.language as tl


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
def _row_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's batch rows x the full hidden row: (rows, hidden, row mask, tile mask, offsets)."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rh = tl.arange(0, BLOCK_H)
    mb, mh = rb < B, rh < H
    return rb, rh, mb, mh, rb[:, None] * H + rh[None, :]


# --- the gated cells' gate blocks (LSTM: 4, GRU: 3) ---------------------------------------------------

@triton.jit
def _sigmoid(a):
    return 1.0 / (1.0 + tl.exp(-a))  # exp overflows to inf for very negative a: 1 / inf = 0


@triton.jit
def _tile(B, H, pid_b, pid_n, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mb, mn = rb < B, rn < H
    return rb, rn, mb, mn, mb[:, None] & mn[None, :]


@triton.jit
def _gate_dot(src_ptr, ld_src, w_ptr, rb, mb, rn, mn, row0, H, acc, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
              FORWARD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One gate block of a recurrent dot, K = H, with W = W_hh ([G*H, H], row-major):
    FORWARD: acc + src[rb, :] @ W[row0 + rn, :]^T  (the block's rows of W are the outputs);
    else:    acc + src[rb, :] @ W[row0 : row0 + H, rn]  (BPTT: the block's rows are summed over).
    src (row stride ld_src) is read through L2 (.cg): another program may have written it in this launch."""
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        a = tl.load(src_ptr + rb[:, None] * ld_src + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                    cache_modifier=".cg")
        if FORWARD:
            w = tl.load(w_ptr + (row0 + rn[None, :]) * H + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + (row0 + rk[:, None]) * H + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _dot(a, w, acc, FP32_DOT, DOT_FP32)
    return acc


@triton.jit
def _gate_inputs(xp_ptr, img_ptr, offs, H, m, HAS_IMG: tl.constexpr, NGATES: tl.constexpr):
    """Each gate's projected input plus image term at offs (NGATES blocks of H columns; the fourth is
    zero when NGATES == 3), as float32: the step's addends, loaded before the recurrent dots."""
    a0 = tl.load(xp_ptr + offs, mask=m, other=0.0).to(tl.float32)
    a1 = tl.load(xp_ptr + offs + H, mask=m, other=0.0).to(tl.float32)
    a2 = tl.load(xp_ptr + offs + 2 * H, mask=m, other=0.0).to(tl.float32)
    a3 = tl.zeros_like(a0)
    if NGATES == 4:
        a3 += tl.load(xp_ptr + offs + 3 * H, mask=m, other=0.0).to(tl.float32)
    if HAS_IMG:
        a0 += tl.load(img_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a1 += tl.load(img_ptr + offs + H, mask=m, other=0.0).to(tl.float32)
        a2 += tl.load(img_ptr + offs + 2 * H, mask=m, other=0.0).to(tl.float32)
        if NGATES == 4:
            a3 += tl.load(img_ptr + offs + 3 * H, mask=m, other=0.0).to(tl.float32)
    return a0, a1, a2, a3


@triton.jit
def _saved_gates(ptr, H, m):
    """The four saved [B, H] gate blocks at ptr (row stride 4H: LSTM i, f, g, o; GRU r, z, n, W_hn h + b_hn)
    as float32."""
    a = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    b = tl.load(ptr + H, mask=m, other=0.0).to(tl.float32)
    c = tl.load(ptr + 2 * H, mask=m, other=0.0).to(tl.float32)
    d = tl.load(ptr + 3 * H, mask=m, other=0.0).to(tl.float32)
    return a, b, c, d


@triton.jit
def _store_gates(ptr, H, m, a, b, c, d):
    """Store four [B, H] blocks at ptr (row stride 4H), in ptr's dtype: _saved_gates' inverse."""
    ty = ptr.dtype.element_ty
    tl.store(ptr, a.to(ty), mask=m)
    tl.store(ptr + H, b.to(ty), mask=m)
    tl.store(ptr + 2 * H, c.to(ty), mask=m)
    tl.store(ptr + 3 * H, d.to(ty), mask=m)


@triton.jit
def _before(ptr, first_ptr, t, step):
    """Step t - 1's slice of a [T, B, .] buffer (row stride `step`), or first_ptr (h0 / c0) at t == 0."""
    p = ptr + (t - 1) * step
    if t == 0:
        p = first_ptr
    return p


@triton.jit
def _gate_block(w_ptr, q, H, rh, mh, TRANSPOSE: tl.constexpr):
    """Gate q's [H, H] block of W_hh ([G*H, H], row-major) as a [K, N] dot operand, padded with zeros:
    TRANSPOSE (forward): W[q*H + n, k];  else (BPTT): W[q*H + k, n]."""
    m = mh[:, None] & mh[None, :]
    if TRANSPOSE:
        offs = (q * H + rh[None, :]) * H + rh[:, None]
    else:
        offs = (q * H + rh[:, None]) * H + rh[None, :]
    return tl.load(w_ptr + offs, mask=m, other=0.0)
