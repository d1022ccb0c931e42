"""Triton kernels of the LSTM recurrence, forward and BPTT.

Each step is one fused pass: the recurrent dots of all gates ([B, H] x [H, G*H], a tile's G column
blocks) + projected input + image term + gate nonlinearities + cell update + lengths mask,
in the RNN's three forms (kernels/rnn.py), chosen by the same size rule with the gate count G = 4
(kernels/launch.py):
* persistent: ONE launch; each program owns 16 batch rows and the whole hidden row, loads W_hh's 4
  gate blocks once and carries h and c (in BPTT dL/dh and dL/dc) in float32 registers. While
  G * Hp^2 stays within the RNN's bound: hidden <= 128 in 16-bit dtypes, <= 64 in float32.
* cooperative: ONE launch for all steps, [block_b, block_n] tiles of hidden units over at most one
  program per SM, a grid barrier between steps. Every larger size.
* step: one launch per step (CUDA-graph capturable), the cooperative form's tile code; on request.
The dot, the tanh and sigmoid, the grid barrier and the gate-block addressing are kernels/common.py's;
the tile choice, TF32 policy and launch options kernels/launch.py's (shared with the RNN and the GRU,
not copied). Every kernel compiles for sm_90 within a Hopper SM's shared memory
(bench/sm90_resources.py, checked in CI without a GPU).

Contract (time-major, as mmrnn_ext/reference.py's reference backend):
    lstm_forward(xp [T,B,4H], w_hh [4H,H], h0, c0, image_term, lengths) -> out, c_all [T,B,H], gates [T,B,4H]
    lstm_backward(grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths) -> dG, dh0, dc0
The activated gates i, f, g, o are saved, zero past each length. The carried dL/dc between steps stays
in float32 (a buffer in the cooperative and step forms, registers in the persistent one).
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
def _lstm_fwd_tile(h_prev_ptr, c_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, c_ptr, gates_ptr, t, B, H,
                   pid_b, pid_n, HAS_IMG: tl.constexpr, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step t of the LSTM for one tile of hidden units: the four gates' dots, activations, c and h.
    xp_ptr, img_ptr (per step), out_ptr, c_ptr and gates_ptr point at step t's slices."""
    rb, rn, mb, mn, m = _tile(B, H, pid_b, pid_n, BLOCK_B, BLOCK_N)
    G = 4 * H
    og = rb[:, None] * G + rn[None, :]
    oh = rb[:, None] * H + rn[None, :]
    acc_i, acc_f, acc_g, acc_o = _gate_inputs(xp_ptr, img_ptr, og, H, m, HAS_IMG, 4)
    c_prev = tl.load(c_prev_ptr + oh, mask=m, other=0.0).to(tl.float32)
    acc_i = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, 0, H, acc_i, FP32_DOT, DOT_FP32, True, BLOCK_K)
    acc_f = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, H, H, acc_f, FP32_DOT, DOT_FP32, True, BLOCK_K)
    acc_g = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, 2 * H, H, acc_g, FP32_DOT, DOT_FP32, True, BLOCK_K)
    acc_o = _gate_dot(h_prev_ptr, H, w_ptr, rb, mb, rn, mn, 3 * H, H, acc_o, FP32_DOT, DOT_FP32, True, BLOCK_K)
    i, f, g, o = _sigmoid(acc_i), _sigmoid(acc_f), _tanh(acc_g), _sigmoid(acc_o)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    if HAS_LEN:
        live = (t < tl.load(len_ptr + rb, mask=mb, other=0))[:, None]
        h, c = tl.where(live, h, 0.0), tl.where(live, c, 0.0)
        i, f, g, o = tl.where(live, i, 0.0), tl.where(live, f, 0.0), tl.where(live, g, 0.0), tl.where(live, o, 0.0)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + oh, h.to(ty), mask=m)
    tl.store(c_ptr + oh, c.to(ty), mask=m)
    _store_gates(gates_ptr + og, H, m, i, f, g, o)


@triton.jit
def _lstm_bwd_tile(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c_prev_ptr, gates_ptr, len_ptr, gc_ptr,
                   dst_ptr, dc0_ptr, t, T, B, H, pid_b, pid_n,
                   HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr, FINAL: tl.constexpr,
                   FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One reverse step of the LSTM's BPTT for one tile:
        gh = dG_{t+1} @ W_hh  (K over 4H),  gc = the float32 carry dL/dc_t (gc_ptr, written at t+1)
        both replaced by grad_h_last / grad_c_last at each row's last step
        dh = dY_t + gh;  dc = gc + dh o (1 - tanh(c_t)^2)
        dG_t = [dc g, dc c_{t-1}, dc i, dh tanh(c_t)] * the gates' derivatives, zero where t >= len
        carry: gc <- dc f
    FINAL (t = -1): writes dh0 = gh and dc0 = gc instead (the final gradients for rows of length 0)."""
    rb, rn, mb, mn, m = _tile(B, H, pid_b, pid_n, BLOCK_B, BLOCK_N)
    G = 4 * H
    og = rb[:, None] * G + rn[None, :]
    oh = rb[:, None] * H + rn[None, :]
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    enters = (t == lens - 1)[:, None]
    ghl = tl.load(ghl_ptr + oh, mask=m & enters, other=0.0).to(tl.float32)
    gcl = tl.load(gcl_ptr + oh, mask=m & enters, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + oh, mask=m, other=0.0)  # float32 carry (zero before the last step)
    if not FINAL:
        gy = tl.load(gy_ptr + oh, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + oh, mask=m, other=0.0).to(tl.float32)
        c_prev = tl.load(c_prev_ptr + oh, mask=m, other=0.0).to(tl.float32)
        i, f, g, o = _saved_gates(gates_ptr + og, H, m)
    gh = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if HAS_NEXT:
        for q in range(4):
            gh = _gate_dot(d_next_ptr + q * H, G, w_ptr, rb, mb, rn, mn, q * H, H, gh, FP32_DOT, DOT_FP32, False,
                           BLOCK_K)
    gh = tl.where(enters, ghl, gh)
    gc = tl.where(enters, gcl, gc)
    if FINAL:
        tl.store(dst_ptr + oh, gh.to(dst_ptr.dtype.element_ty), mask=m)
        tl.store(dc0_ptr + oh, gc.to(dc0_ptr.dtype.element_ty), mask=m)
    else:
        tc = _tanh(c)
        dh = gy + gh
        dc = gc + dh * o * (1.0 - tc * tc)
        d_i = dc * g * i * (1.0 - i)
        d_f = dc * c_prev * f * (1.0 - f)
        d_g = dc * i * (1.0 - g * g)
        d_o = dh * tc * o * (1.0 - o)
        if HAS_LEN:
            live = (t < lens)[:, None]
            d_i, d_f = tl.where(live, d_i, 0.0), tl.where(live, d_f, 0.0)
            d_g, d_o = tl.where(live, d_g, 0.0), tl.where(live, d_o, 0.0)
        _store_gates(dst_ptr + og, H, m, d_i, d_f, d_g, d_o)
        tl.store(gc_ptr + oh, dc * f, mask=m)  # f is zero past the length: nothing carries from dead steps


@triton.jit(do_not_specialize=["t"])
def lstm_fwd_step_kernel(h_prev_ptr, c_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, c_ptr, gates_ptr, t, B, H,
                         HAS_IMG: tl.constexpr, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _lstm_fwd_tile(h_prev_ptr, c_prev_ptr, w_ptr, xp_ptr, img_ptr, len_ptr, out_ptr, c_ptr, gates_ptr, t, B, H,
                   tl.program_id(0), tl.program_id(1), HAS_IMG, HAS_LEN, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["t"])
def lstm_bwd_step_kernel(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c_prev_ptr, gates_ptr, len_ptr, gc_ptr,
                         dst_ptr, dc0_ptr, t, T, B, H, HAS_NEXT: tl.constexpr, HAS_LEN: tl.constexpr,
                         FINAL: tl.constexpr, FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _lstm_bwd_tile(d_next_ptr, w_ptr, gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c_prev_ptr, gates_ptr, len_ptr, gc_ptr,
                   dst_ptr, dc0_ptr, t, T, B, H, tl.program_id(0), tl.program_id(1), HAS_NEXT, HAS_LEN, FINAL,
                   FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def lstm_fwd_coop_kernel(xp_ptr, w_ptr, h0_ptr, c0_ptr, img_ptr, len_ptr, out_ptr, c_ptr, gates_ptr, count_ptr,
                         T, B, H, HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_LEN: tl.constexpr,
                         FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cooperative form: ONE launch for all T steps, tiles pid, pid + P, ..., a grid barrier per step."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step, gstep = B * H, B * 4 * H
    for t in range(T):
        h_prev, c_prev = _before(out_ptr, h0_ptr, t, step), _before(c_ptr, c0_ptr, t, step)
        img_t = img_ptr
        if IMG_PER_STEP:
            img_t = img_ptr + t * gstep
        for tile in range(pid, n_tiles, nprog):
            _lstm_fwd_tile(h_prev, c_prev, w_ptr, xp_ptr + t * gstep, img_t, len_ptr, out_ptr + t * step,
                           c_ptr + t * step, gates_ptr + t * gstep, t, B, H, tile % n_tb, tile // n_tb,
                           HAS_IMG, HAS_LEN, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, t + 1)


@triton.jit
def lstm_bwd_coop_kernel(gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c0_ptr, gates_ptr, w_ptr, len_ptr, gc_ptr, dG_ptr, dh0_ptr,
                         dc0_ptr, count_ptr, T, B, H, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                         DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Cooperative form, backward: all T reverse steps and (dh0, dc0) in one launch."""
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    n_tb = tl.cdiv(B, BLOCK_B)
    n_tiles = n_tb * tl.cdiv(H, BLOCK_N)
    step, gstep = B * H, B * 4 * H
    last = T - 1
    c_prev = _before(c_ptr, c0_ptr, last, step)
    for tile in range(pid, n_tiles, nprog):  # step T - 1: nothing flows in from a later step
        _lstm_bwd_tile(dG_ptr, w_ptr, gy_ptr + last * step, ghl_ptr, gcl_ptr, c_ptr + last * step, c_prev,
                       gates_ptr + last * gstep, len_ptr, gc_ptr, dG_ptr + last * gstep, dc0_ptr, last, T, B, H,
                       tile % n_tb, tile // n_tb, False, HAS_LEN, False, FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)
    _grid_barrier(count_ptr, 1)
    for i in range(1, T):
        t = T - 1 - i
        c_prev = _before(c_ptr, c0_ptr, t, step)
        for tile in range(pid, n_tiles, nprog):
            _lstm_bwd_tile(dG_ptr + (t + 1) * gstep, w_ptr, gy_ptr + t * step, ghl_ptr, gcl_ptr, c_ptr + t * step,
                           c_prev, gates_ptr + t * gstep, len_ptr, gc_ptr, dG_ptr + t * gstep, dc0_ptr, t, T, B, H,
                           tile % n_tb, tile // n_tb, True, HAS_LEN, False, FP32_DOT, DOT_FP32,
                           BLOCK_B, BLOCK_N, BLOCK_K)
        _grid_barrier(count_ptr, i + 1)
    for tile in range(pid, n_tiles, nprog):  # dh0 = dG_0 @ W_hh, dc0 = the carry (final gradients for length 0)
        _lstm_bwd_tile(dG_ptr, w_ptr, gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c0_ptr, gates_ptr, len_ptr, gc_ptr,
                       dh0_ptr, dc0_ptr, -1, T, B, H, tile % n_tb, tile // n_tb, True, HAS_LEN, True,
                       FP32_DOT, DOT_FP32, BLOCK_B, BLOCK_N, BLOCK_K)


# --- persistent form: W_hh's gate blocks loaded once, the state carried in registers --------------

@triton.jit
def lstm_fwd_persistent_kernel(xp_ptr, w_ptr, h0_ptr, c0_ptr, img_ptr, len_ptr, out_ptr, c_ptr, gates_ptr, T, B, H,
                               HAS_IMG: tl.constexpr, IMG_PER_STEP: tl.constexpr, HAS_LEN: tl.constexpr,
                               FP32_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T steps of the LSTM for one batch tile: the four gate blocks of W_hh^T loaded once, h and c
    carried in float32 registers (the step and cooperative forms re-read them as stored)."""
    rb, rh, mb, mh, oh = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    og = rb[:, None] * 4 * H + rh[None, :]
    w_i, w_f = _gate_block(w_ptr, 0, H, rh, mh, True), _gate_block(w_ptr, 1, H, rh, mh, True)
    w_g, w_o = _gate_block(w_ptr, 2, H, rh, mh, True), _gate_block(w_ptr, 3, H, rh, mh, True)
    h = tl.load(h0_ptr + oh, mask=m, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + oh, mask=m, other=0.0).to(tl.float32)
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    step, gstep = B * H, B * 4 * H
    ty = out_ptr.dtype.element_ty
    for t in range(T):
        # loads first, off the h chain; a static image term is re-read each step (cache-resident)
        # rather than held in registers
        acc_i, acc_f, acc_g, acc_o = _gate_inputs(xp_ptr, img_ptr, og, H, m, HAS_IMG, 4)
        if IMG_PER_STEP:
            img_ptr += gstep
        hd = h.to(w_i.dtype)
        acc_i = _dot(hd, w_i, acc_i, FP32_DOT, DOT_FP32)
        acc_f = _dot(hd, w_f, acc_f, FP32_DOT, DOT_FP32)
        acc_g = _dot(hd, w_g, acc_g, FP32_DOT, DOT_FP32)
        acc_o = _dot(hd, w_o, acc_o, FP32_DOT, DOT_FP32)
        i, f, g, o = _sigmoid(acc_i), _sigmoid(acc_f), _tanh(acc_g), _sigmoid(acc_o)
        c_new = f * c + i * g
        h_new = o * _tanh(c_new)
        live = (t < lens)[:, None]
        h, c = tl.where(live, h_new, h), tl.where(live, c_new, c)
        tl.store(out_ptr + oh, tl.where(live, h_new, 0.0).to(ty), mask=m)
        tl.store(c_ptr + oh, tl.where(live, c_new, 0.0).to(ty), mask=m)
        _store_gates(gates_ptr + og, H, m, tl.where(live, i, 0.0), tl.where(live, f, 0.0), tl.where(live, g, 0.0),
                     tl.where(live, o, 0.0))
        xp_ptr += gstep
        gates_ptr += gstep
        out_ptr += step
        c_ptr += step


@triton.jit
def lstm_bwd_persistent_kernel(gy_ptr, ghl_ptr, gcl_ptr, c_ptr, c0_ptr, gates_ptr, w_ptr, len_ptr, dG_ptr, dh0_ptr,
                               dc0_ptr, T, B, H, HAS_LEN: tl.constexpr, FP32_DOT: tl.constexpr,
                               DOT_FP32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """All T reverse steps of the LSTM's BPTT for one batch tile (the algebra of _lstm_bwd_tile):
    W_hh's gate blocks loaded once, dL/dh and dL/dc carried in float32 registers."""
    rb, rh, mb, mh, oh = _row_tile(B, H, BLOCK_B, BLOCK_H)
    m = mb[:, None] & mh[None, :]
    og = rb[:, None] * 4 * H + rh[None, :]
    w_i, w_f = _gate_block(w_ptr, 0, H, rh, mh, False), _gate_block(w_ptr, 1, H, rh, mh, False)
    w_g, w_o = _gate_block(w_ptr, 2, H, rh, mh, False), _gate_block(w_ptr, 3, H, rh, mh, False)
    lens = _lens_of(len_ptr, rb, mb, T, BLOCK_B, HAS_LEN)
    ghl = tl.load(ghl_ptr + oh, mask=m, other=0.0).to(tl.float32)
    gcl = tl.load(gcl_ptr + oh, mask=m, other=0.0).to(tl.float32)
    gh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    gc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    step, gstep = B * H, B * 4 * H
    ty = dG_ptr.dtype.element_ty
    for s in range(T):
        t = T - 1 - s
        c_prev_ptr = _before(c_ptr, c0_ptr, t, step)
        gy = tl.load(gy_ptr + t * step + oh, mask=m, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + t * step + oh, mask=m, other=0.0).to(tl.float32)
        c_prev = tl.load(c_prev_ptr + oh, mask=m, other=0.0).to(tl.float32)
        i, f, g, o = _saved_gates(gates_ptr + t * gstep + og, H, m)
        enters = (t == lens - 1)[:, None]
        gh, gc = tl.where(enters, ghl, gh), tl.where(enters, gcl, gc)
        tc = _tanh(c)
        dh = gy + gh
        dc = gc + dh * o * (1.0 - tc * tc)
        live = (t < lens)[:, None]
        d_i = tl.where(live, dc * g * i * (1.0 - i), 0.0).to(ty)
        d_f = tl.where(live, dc * c_prev * f * (1.0 - f), 0.0).to(ty)
        d_g = tl.where(live, dc * i * (1.0 - g * g), 0.0).to(ty)
        d_o = tl.where(live, dh * tc * o * (1.0 - o), 0.0).to(ty)
        _store_gates(dG_ptr + t * gstep + og, H, m, d_i, d_f, d_g, d_o)
        gh = _dot(d_i.to(w_i.dtype), w_i, tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32), FP32_DOT, DOT_FP32)
        gh = _dot(d_f.to(w_i.dtype), w_f, gh, FP32_DOT, DOT_FP32)
        gh = _dot(d_g.to(w_i.dtype), w_g, gh, FP32_DOT, DOT_FP32)
        gh = _dot(d_o.to(w_i.dtype), w_o, gh, FP32_DOT, DOT_FP32)
        gc = dc * f  # f is zero past the length: nothing carries from dead steps
    empty = (lens == 0)[:, None]  # rows of length 0: the final state's gradients are h0's and c0's
    tl.store(dh0_ptr + oh, tl.where(empty, ghl, gh).to(dh0_ptr.dtype.element_ty), mask=m)
    tl.store(dc0_ptr + oh, tl.where(empty, gcl, gc).to(dc0_ptr.dtype.element_ty), mask=m)


# --- launchers ------------------------------------------------------------------------------------

def lstm_forward(xp, w_hh, h0, c0, image_term, lengths, form=None, config=None):
    """-> (out [T, B, H], c_all [T, B, H], gates [T, B, 4H]); inputs contiguous, one device and dtype."""
    T, B, G = xp.shape
    H = G // 4
    out, c_all, gates = xp.new_empty(T, B, H), xp.new_empty(T, B, H), torch.empty_like(xp)
    if T == 0 or B == 0:
        return out, c_all, gates
    form, grid, flags, blocks, w, _ = plan(xp, B, H, w_hh, form, config, backward=False)
    has_img, has_len = image_term is not None, lengths is not None
    per_step = has_img and image_term.dim() == 3
    img, lens = (image_term if has_img else xp), (lengths if has_len else xp)  # never read when absent
    flags.update(HAS_IMG=has_img, HAS_LEN=has_len)
    if form == "persistent":
        lstm_fwd_persistent_kernel[grid](xp, w, h0, c0, img, lens, out, c_all, gates, T, B, H, IMG_PER_STEP=per_step,
                                         **flags, **blocks)
        return out, c_all, gates
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=xp.device)
        lstm_fwd_coop_kernel[grid](xp, w, h0, c0, img, lens, out, c_all, gates, count, T, B, H,
                                   IMG_PER_STEP=per_step, **flags, **blocks)
        return out, c_all, gates
    for t in range(T):
        lstm_fwd_step_kernel[grid](h0 if t == 0 else out[t - 1], c0 if t == 0 else c_all[t - 1], w, xp[t],
                                   img[t] if per_step else img, lens, out[t], c_all[t], gates[t], t, B, H,
                                   **flags, **blocks)
    return out, c_all, gates


def lstm_backward(grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths, form=None, config=None):
    """-> (dG [T, B, 4H], dh0 [B, H], dc0 [B, H])."""
    T, B, H = out.shape
    dG, dh0, dc0 = torch.empty_like(gates), torch.empty_like(h0), torch.empty_like(c0)
    if B == 0:
        return dG, dh0, dc0
    if T == 0:
        return dG, grad_h_last.clone(), grad_c_last.clone()
    form, grid, flags, blocks, w, _ = plan(out, B, H, w_hh, form, config, backward=True)
    has_len = lengths is not None
    lens = lengths if has_len else out
    flags.update(HAS_LEN=has_len)
    if form == "persistent":
        lstm_bwd_persistent_kernel[grid](grad_out, grad_h_last, grad_c_last, c_all, c0, gates, w, lens, dG, dh0, dc0,
                                         T, B, H, **flags, **blocks)
        return dG, dh0, dc0
    carry = torch.zeros(B, H, dtype=torch.float32, device=out.device)
    if form == "cooperative":
        count = torch.zeros(1, dtype=torch.int32, device=out.device)
        lstm_bwd_coop_kernel[grid](grad_out, grad_h_last, grad_c_last, c_all, c0, gates, w, lens, carry, dG, dh0, dc0,
                                   count, T, B, H, **flags, **blocks)
        return dG, dh0, dc0
    for t in range(T - 1, -1, -1):
        lstm_bwd_step_kernel[grid](dG[t + 1] if t + 1 < T else dG[t], w, grad_out[t], grad_h_last, grad_c_last,
                                   c_all[t], c0 if t == 0 else c_all[t - 1], gates[t], lens, carry, dG[t], dc0, t, T,
                                   B, H, HAS_NEXT=t + 1 < T, FINAL=False, **flags, **blocks)
    lstm_bwd_step_kernel[grid](dG[0], w, grad_out[0], grad_h_last, grad_c_last, c_all[0], c0, gates[0], lens, carry,
                               dh0, dc0, -1, T, B, H, HAS_NEXT=True, FINAL=True, **flags, **blocks)
    return dG, dh0, dc0
