"""Triton kernels of the GRU recurrence, forward and BPTT.

Each step is one fused pass: the recurrent dots of all gates ([B, H] x [H, G*H], a tile's G column
blocks) + projected input + image term + gate nonlinearities + reset product with b_hn + lengths mask,
in the RNN's three forms (kernels/rnn.py), chosen by the same size rule with the gate count G = 3
(kernels/launch.py):
* persistent: ONE launch; each program owns 16 batch rows and the whole hidden row, loads W_hh's 3
  gate blocks once and carries h (in BPTT dL/dh) in float32 registers. While
  G * Hp^2 stays within the RNN's bound: hidden <= 128 in 16-bit dtypes, <= 64 in float32.
* cooperative: ONE launch for all steps, [block_b, block_n] tiles of hidden units over at most one
  program per SM, a grid barrier between steps. Every larger size.
* step: one launch per step (CUDA-graph capturable), the cooperative form's tile code; on request.
The dot, the tanh and sigmoid, the grid barrier and the gate-block addressing are kernels/common.py's;
the tile choice, TF32 policy and launch options kernels/launch.py's (shared with the RNN and the LSTM,
not copied). Every kernel compiles for sm_90 within a Hopper SM's shared memory
(bench/sm90_resources.py, checked in CI without a GPU).

Contract (time-major, as mmrnn_ext/reference.py's reference backend):
    gru_forward(xp [T,B,3H], w_hh [3H,H], b_hn [H] or None, h0, image_term, lengths) -> out, gates [T,B,4H]
    gru_backward(grad_out, grad_h_last, out, gates, h0, w_hh, lengths) -> dGx [T,B,3H], dhn [T,B,H], dh0
Saved per step: r, z, n and W_hn h + b_hn, zero past each length. The gradient carried between steps
through z stays in float32 (a buffer in the cooperative and step forms, registers in the persistent one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (_before, _dot, _gate_block, _gate_dot, _gate_inputs, _grid_barrier, _lens_of, _row_tile,
                     _saved_gates, _sigmoid, _store_gates, _tanh, _tile)
from .launch import plan


# --- step and cooperative forms: one [block_b, block_n] tile of a step ----------------------------

@triton.jit
def _gru_fwd_tile(h_prev_ptr, w_ptr, bhn_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, gates_ptr, t, B, H, pid_b, pid_n,
                  HAS_IMG: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                  DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of the GRU for one tile: r, z from (x + W h), n = tanh(x_n + r (W_hn h + b_hn)),
    h = n + z (h_{t-1} - n). Saves r, z, n and W_hn h + b_hn."""
    rb, rn, mb, mn, m = _tile(B, H, pid_b, pid_n, BLOCK_B, BLOCK_N)
    G = 3 * H
    ox = rb[:, None] * G + rn[None, :]
    oh = rb[:, None] * H + rn[None, :]
    og = rb[:, None] * 4 * H + rn[None, :]
    x_r, x_z, x_n, _ = _gate_inputs(xp_ptr, img_ptr, ox, H, m, HAS_IMG, 3)
    hn = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_BHN:
        hn += tl.load(bhn_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    h_prev = tl.load(h_prev_ptr + oh, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
    x_r = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, 0, H, x_r, FP32_DOT, DOT_FP32, True, BLOCK_K)
    x_z = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, H, H, x_z, FP32_DOT, DOT_FP32, True, BLOCK_K)
    hn = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, 2 * H, H, hn, FP32_DOT, DOT_FP32, True, BLOCK_K)
    r, z = _sigmoid(x_r), _sigmoid(x_z)
    n = _tanh(x_n + r * hn)
    h = n + z * (h_prev - n)
    if HAS_LEN:
        live = (t < tl.load(len_ptr + rb, mask=mb, other=0))[:, None]
        h, r, z = tl.where(live, h, 0.0), tl.where(live, r, 0.0), tl.where(live, z, 0.0)
        n, hn = tl.where(live, n, 0.0), tl.where(live, hn, 0.0)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + oh, h.to(ty), mask=m)
    _store_gates(gates_ptr + og, H, m, r, z, n, hn)


@triton.jit
def _gru_bwd_tile(dx_next_ptr, dhn_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_prev_ptr, gates_ptr, len_ptr, carry_ptr,
                  dx_ptr, dhn_ptr, t, T, B, H, pid_b, pid_n, HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr,
                  FINAL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One reverse step of the GRU's BPTT for one tile:
        gh = [dGx_r, dGx_z, dhn]_{t+1} @ W_hh (K over 3H) + the float32 carry dh_{t+1} z_{t+1}
        replaced by grad_h_last at each row's last step; dh = dY_t + gh
        dn = dh (1 - z)(1 - n^2);  dz = dh (h_{t-1} - n) z (1 - z);  dr = dn hn r (1 - r);  dhn = dn r
        zero where t >= len; carry <- dh z
    FINAL (t = -1): writes dh0 = gh to dx_ptr instead."""
    rb, rn, mb, mn, m = _tile(B, H, pid_b, pid_n, BLOCK_B, BLOCK_N)
    G = 3 * H
    ox = rb[:, None] * G + rn[None, :]
    oh = rb[:, None] * H + rn[None, :]
    og = rb[:, None] * 4 * H + rn[None, :]
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    enters = (t == lens - 1)[:, None]
    ghl = tl.load(ghl_ptr + oh, mask=m & enters, other=0.0).to(tl.float32)
    gh = tl.load(carry_ptr + oh, mask=m, other=0.0)  # float32 dh_{t+1} z_{t+1} (zero before the last step)
    if not FINAL:
        gy = tl.load(gy_ptr + oh, mask=m, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + oh, mask=m, other=0.0).to(tl.float32)
        r, z, n, hn = _saved_gates(gates_ptr + og, H, m)
    if HAS_NEXT:
        gh = _gate_dot(dx_next_ptr, G, w_ptr, rb, mb, rn, mn, 0, H, gh, FP32_DOT, DOT_FP32, False, BLOCK_K)
        gh = _gate_dot(dx_next_ptr + H, G, w_ptr, rb, mb, rn, mn, H, H, gh, FP32_DOT, DOT_FP32, False, BLOCK_K)
        gh = _gate_dot(dhn_next_ptr, H, w_ptr, rb, mb, rn, mn, 2 * H, H, gh, FP32_DOT, DOT_FP32, False, BLOCK_K)
    gh = tl.where(enters, ghl, gh)
    if FINAL:
        tl.store(dx_ptr + oh, gh.to(dx_ptr.dtype.element_ty), mask=m)
    else:
        dh = gy + gh
        dn = dh * (1.0 - z) * (1.0 - n * n)
        dz = dh * (h_prev - n) * z * (1.0 - z)
        dr = dn * hn * r * (1.0 - r)
        d_hn = dn * r
        if HAS_LEN:
            live = (t < lens)[:, None]
            dn, dz, dr, d_hn = tl.where(live, dn, 0.0), tl.where(live, dz, 0.0), tl.where(live, dr, 0.0), tl.where(live, d_hn, 0.0)
        ty = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + ox, dr.to(ty), mask=m)
        tl.store(dx_ptr + ox + H, dz.to(ty), mask=m)
        tl.store(dx_ptr + ox + 2 * H, dn.to(ty), mask=m)
        tl.store(dhn_ptr + oh, d_hn.to(ty), mask=m)
        tl.store(carry_ptr + oh, dh * z, mask=m)  # z is zero past the length


@triton.jit(do_not_specialize=["t"])
def gru_fwd_step_kernel(h_prev_ptr, w_ptr, bhn_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, gates_ptr, t, B, H,
                        HAS_IMG: tl.constexpr, HAS_BHN: tl.constexpr, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                        DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gru_fwd_tile(h_prev_ptr, w_ptr, bhn_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, gates_ptr, t, B, H,
                  tl.program_id(0), tl.program_id(1), HAS_IMG, HAS_BHN, HAS_LEN, FP32_DOT, DOT_FP32,
                  BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["t"])
def gru_bwd_step_kernel(dx_next_ptr, dhn_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_prev_ptr, gates_ptr, len_ptr, carry_ptr,
                        dx_ptr, dhn_ptr, t, T, B, H, HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr,
                        FINAL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gru_bwd_tile(dx_next_ptr, dhn_next_ptr, w_ptr, gy_ptr, ghl_ptr, h_prev_ptr, gates_ptr, len_ptr, carry_ptr,
                  dx_ptr, dhn_ptr, t, T, B, H, tl.program_id(0), tl.program_id(1), HAS_NEXT, HAS_LEN, FINAL,
                  FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def gru_fwd_coop_kernel(xp_ptr, w_ptr, bhn_ptr, h0_ptr, img_ptr, len_ptr, out_ptr, gates_ptr, count_ptr, T, B, H,
                        HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_BHN: tl.constexpr,
                        HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step, xstep = B * H, B * 3 * H
    for t in range(T):
        h_prev = _before(out_ptr, h0_ptr, t, step)
        img_t = img_ptr
        if IMG_PER_STEP:
            img_t = img_ptr + t * xstep
        for tile in range(pid, n_tiles, nprog):
            _gru_fwd_tile(h_prev, w_ptr, bhn_ptr, xp_ptr + t * xstep, img_t, len_ptr, out_ptr + t * step,
                          gates_ptr + t * 4 * step, t, B, H, tile % n_tb, tile // n_tb, HAS_IMG, HAS_BHN, HAS_LEN,
                          FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, t + 1)


@triton.jit
def gru_bwd_coop_kernel(gy_ptr, ghl_ptr, out_ptr, h0_ptr, gates_ptr, w_ptr, len_ptr, carry_ptr, dx_ptr, dhn_ptr,
                        dh0_ptr, count_ptr, T, B, H, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                        DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step, xstep = B * H, B * 3 * H
    last = T - 1
    h_prev = _before(out_ptr, h0_ptr, last, step)
    for tile in range(pid, n_tiles, nprog):
        _gru_bwd_tile(dx_ptr, dhn_ptr, w_ptr, gy_ptr + last * step, ghl_ptr, h_prev, gates_ptr + last * 4 * step,
                      len_ptr, carry_ptr, dx_ptr + last * xstep, dhn_ptr + last * step, last, T, B, H,
                      tile % n_tb, tile // n_tb, False, HAS_LEN, False, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
    _grid_barrier(count_ptr, 1)
    for i in range(1, T):
        t = T - 1 - i
        h_prev = _before(out_ptr, h0_ptr, t, step)
        for tile in range(pid, n_tiles, nprog):
            _gru_bwd_tile(dx_ptr + (t + 1) * xstep, dhn_ptr + (t + 1) * step, w_ptr, gy_ptr + t * step, ghl_ptr,
                          h_prev, gates_ptr + t * 4 * step, len_ptr, carry_ptr, dx_ptr + t * xstep,
                          dhn_ptr + t * step, t, T, B, H, tile % n_tb, tile // n_tb, True, HAS_LEN, False,
                          FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, i + 1)
    for tile in range(pid, n_tiles, nprog):  # dh0
        _gru_bwd_tile(dx_ptr, dhn_ptr, w_ptr, gy_ptr, ghl_ptr, h0_ptr, gates_ptr, len_ptr, carry_ptr, dh0_ptr,
                      dhn_ptr, -1, T, B, H, tile % n_tb, tile // n_tb, True, HAS_LEN, True,
                      FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


# --- persistent form: W_hh's gate blocks loaded once, the state carried in registers --------------

@triton.jit
def gru_fwd_persistent_kernel(xp_ptr, w_ptr, bhn_ptr, h0_ptr, img_ptr, len_ptr, out_ptr, gates_ptr, T, B, H,
                              HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_BHN: tl.constexpr,
                              HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T steps of the GRU for one batch tile: the three gate blocks of W_hh^T loaded once, h carried
    in float32 registers."""
    rb, rh, mb, mh, oh = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    ox = rb[:, None] * 3 * H + rh[None, :]
    og = rb[:, None] * 4 * H + rh[None, :]
    w_r, w_z, w_n = (_gate_block(w_ptr, 0, H, rh, mh, True), _gate_block(w_ptr, 1, H, rh, mh, True),
                     _gate_block(w_ptr, 2, H, rh, mh, True))
    bhn = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_BHN:
        bhn += tl.load(bhn_ptr + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
    h = tl.load(h0_ptr + oh, mask=m, other=0.0).to(tl.float32)
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    step, xstep = B * H, B * 3 * H
    ty = out_ptr.dtype.element_ty
    for t in range(T):
        x_r, x_z, x_n, _ = _gate_inputs(xp_ptr, img_ptr, ox, H, m, HAS_IMG, 3)
        if IMG_PER_STEP:
            img_ptr += xstep
        hd = h.to(w_r.dtype)
        x_r = _dot(hd, w_r, x_r, FP32_DOT, DOT_FP32)
        x_z = _dot(hd, w_z, x_z, FP32_DOT, DOT_FP32)
        hn = _dot(hd, w_n, bhn, FP32_DOT, DOT_FP32)
        r, z = _sigmoid(x_r), _sigmoid(x_z)
        n = _tanh(x_n + r * hn)
        h_new = n + z * (h - n)
        live = (t < lens)[:, None]
        h = tl.where(live, h_new, h)
        tl.store(out_ptr + oh, tl.where(live, h_new, 0.0).to(ty), mask=m)
        _store_gates(gates_ptr + og, H, m, tl.where(live, r, 0.0), tl.where(live, z, 0.0), tl.where(live, n, 0.0),
                     tl.where(live, hn, 0.0))
        xp_ptr += xstep
        gates_ptr += 4 * step
        out_ptr += step


@triton.jit
def gru_bwd_persistent_kernel(gy_ptr, ghl_ptr, out_ptr, h0_ptr, gates_ptr, w_ptr, len_ptr, dx_ptr, dhn_ptr, dh0_ptr,
                              T, B, H, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T reverse steps of the GRU's BPTT for one batch tile (the algebra of _gru_bwd_tile): W_hh's
    gate blocks loaded once, dL/dh carried in float32 registers."""
    rb, rh, mb, mh, oh = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    ox = rb[:, None] * 3 * H + rh[None, :]
    og = rb[:, None] * 4 * H + rh[None, :]
    w_r, w_z, w_n = (_gate_block(w_ptr, 0, H, rh, mh, False), _gate_block(w_ptr, 1, H, rh, mh, False),
                     _gate_block(w_ptr, 2, H, rh, mh, False))
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    ghl = tl.load(ghl_ptr + oh, mask=m, other=0.0).to(tl.float32)
    gh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    step, xstep = B * H, B * 3 * H
    ty = dx_ptr.dtype.element_ty
    for s in range(T):
        t = T - 1 - s
        h_prev_ptr = _before(out_ptr, h0_ptr, t, step)
        gy = tl.load(gy_ptr + t * step + oh, mask=m, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + oh, mask=m, other=0.0).to(tl.float32)
        r, z, n, hn = _saved_gates(gates_ptr + t * 4 * step + og, H, m)
        gh = tl.where((t == lens - 1)[:, None], ghl, gh)
        dh = gy + gh
        dn = dh * (1.0 - z) * (1.0 - n * n)
        live = (t < lens)[:, None]
        dz = tl.where(live, dh * (h_prev - n) * z * (1.0 - z), 0.0).to(ty)
        dr = tl.where(live, dn * hn * r * (1.0 - r), 0.0).to(ty)
        d_hn = tl.where(live, dn * r, 0.0).to(ty)
        tl.store(dx_ptr + t * xstep + ox, dr, mask=m)
        tl.store(dx_ptr + t * xstep + ox + H, dz, mask=m)
        tl.store(dx_ptr + t * xstep + ox + 2 * H, tl.where(live, dn, 0.0).to(ty), mask=m)
        tl.store(dhn_ptr + t * step + oh, d_hn, mask=m)
        gh = _dot(dr.to(w_r.dtype), w_r, dh * z, FP32_DOT, DOT_FP32)  # z is zero past the length
        gh = _dot(dz.to(w_r.dtype), w_z, gh, FP32_DOT, DOT_FP32)
        gh = _dot(d_hn.to(w_r.dtype), w_n, gh, FP32_DOT, DOT_FP32)
    tl.store(dh0_ptr + oh, tl.where((lens == 0)[:, None], ghl, gh).to(dh0_ptr.dtype.element_ty), mask=m)


# --- launchers ------------------------------------------------------------------------------------

def gru_forward(xp, w_hh, b_hn, h0, image_term, lengths, form=None, config=None):
    """-> (out [T, B, H], gates [T, B, 4H]: r, z, n, W_hn h + b_hn)."""
    T, B, G = xp.shape
    H = G // 3
    out, gates = xp.new_empty(T, B, H), xp.new_empty(T, B, 4 * H)
    if T == 0 or B == 0:
        return out, gates
    form, grid, flags, blocks, w, _ = plan(xp, B, H, w_hh, form, config, backward=False)
    has_img, has_len, has_bhn = image_term is not None, lengths is not None, b_hn is not None
    per_step = has_img and image_term.dim() == 3
    img, lens, bhn = (image_term if has_img else xp), (lengths if has_len else xp), (b_hn if has_bhn else xp)
    flags.update(HAS_IMG=has_img, HAS_LEN=has_len, HAS_BHN=has_bhn)
    if form == "persistent":
        gru_fwd_persistent_kernel[grid](xp, w, bhn, h0, img, lens, out, gates, T, B, H, IMG_PER_STEP=per_step,
                                        **flags, **blocks)
        return out, gates
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=xp.device)
        gru_fwd_coop_kernel[grid](xp, w, bhn, h0, img, lens, out, gates, count, T, B, H, IMG_PER_STEP=per_step,
                                  **flags, **blocks)
        return out, gates
    for t in range(T):
        gru_fwd_step_kernel[grid](h0 if t == 0 else out[t - 1], w, bhn, xp[t], img[t] if per_step else img, lens,
                                  out[t], gates[t], t, B, H, **flags, **blocks)
    return out, gates


def gru_backward(grad_out, grad_h_last, out, gates, h0, w_hh, lengths, form=None, config=None):
    """-> (dGx [T, B, 3H], dhn [T, B, H], dh0 [B, H])."""
    T, B, H = out.shape
    dx, dhn, dh0 = out.new_empty(T, B, 3 * H), torch.empty_like(out), torch.empty_like(h0)
    if B == 0:
        return dx, dhn, dh0
    if T == 0:
        return dx, dhn, grad_h_last.clone()
    form, grid, flags, blocks, w, _ = plan(out, B, H, w_hh, form, config, backward=True)
    has_len = lengths is not None
    lens = lengths if has_len else out
    flags.update(HAS_LEN=has_len)
    if form == "persistent":
        gru_bwd_persistent_kernel[grid](grad_out, grad_h_last, out, h0, gates, w, lens, dx, dhn, dh0, T, B, H,
                                        **flags, **blocks)
        return dx, dhn, dh0
    carry = torch.zeros(B, H, dtype=torch.float32, device=out.device)
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=out.device)
        gru_bwd_coop_kernel[grid](grad_out, grad_h_last, out, h0, gates, w, lens, carry, dx, dhn, dh0, count,
                                  T, B, H, **flags, **blocks)
        return dx, dhn, dh0
    for t in range(T - 1, -1, -1):
        nxt = t + 1 if t + 1 < T else t
        gru_bwd_step_kernel[grid](dx[nxt], dhn[nxt], w, grad_out[t], grad_h_last, h0 if t == 0 else out[t - 1],
                                  gates[t], lens, carry, dx[t], dhn[t], t, T, B, H, HAS_NEXT=t + 1 < T, FINAL=False,
                                  **flags, **blocks)
    gru_bwd_step_kernel[grid](dx[0], dhn[0], w, grad_out[0], grad_h_last, h0, gates[0], lens, carry, dh0, dhn[0],
                              -1, T, B, H, HAS_NEXT=True, FINAL=True, **flags, **blocks)
    return dx, dhn, dh0
