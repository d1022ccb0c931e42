"""The GRU recurrence as a differentiable op.

    out, h_last = gru_recurrence(xp, w_hh, b_hn, h0, image_term=None, lengths=None)

Time-major shapes (see ``mmrnn_ext.reference`` for the full contract):
    xp [T, B, 3H] (gates r, z, n), w_hh [3H, H], b_hn None or [H] (the bias inside the reset
    product), h0 [B, H], image_term [B, 3H] or [T, B, 3H] (outside the reset product, like the
    input), lengths int64 [B] -> out [T, B, H] (zero past each row's length), h_last [B, H]

Registered as the torch.library custom ops mmrnn::gru_fwd and mmrnn::gru_bwd. Backward saves the
outputs and r, z, n, W_hn h + b_hn (5H per step and row with h: what nn.GRU's fused kernels keep),
h0 and W_hh — never the projected input. dW_hh is two passes over all steps after the reverse loop
(the r, z rows and the n rows, whose gradient passes through the reset gate): on the CPU engine in
float32 first-order backward (csrc/engine.h, weight_grad), torch's GEMMs otherwise.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .. import _backends
from ..reference import gru_reference_backward, gru_reference_jvp
from .common import (EagerOp, FusedInputOp, backend_bptt, check_image_term, check_like, check_xp, engine_of,
                     image_grad, inference_forward, last_state, prepare_lengths, registered_backward, weight_grad,
                     zeros_if_none)

CELL, PUBLIC = "gru", 2
# FusedInputOp: where the outer term and b_hn (b_hh's last H entries) go among the op's inputs after xp
IMAGE_SLOT, INNER_BIAS_SLOT = 3, 1


def check_recurrence_args(xp, w_hh, b_hn, h0, image_term):
    T, B, H = check_xp(xp, 3)
    check_like("w_hh", w_hh, (3 * H, H), xp)
    if b_hn is not None:
        check_like("b_hn", b_hn, (H,), xp)
    check_like("h0", h0, (B, H), xp)
    check_image_term(image_term, T, B, 3 * H, xp)


def forward(be, xp, w_hh, b_hn, h0, image_term, lengths, backend):
    h0 = h0.contiguous()
    out, gates = be.cells[CELL].forward(xp.contiguous(), w_hh.contiguous(), None if b_hn is None else b_hn.contiguous(),
                                        h0, None if image_term is None else image_term.contiguous(), lengths)
    return out, last_state(out, h0, lengths), gates


def fused_forward(engine, x, w_ih, w_hh, b_hn, h0, image_term, lengths, backend):
    """forward's outputs for xp = x @ w_ih^T, the input product inside each step's tile (W_in x_t
    kept apart from W_hn h_{t-1}, which the reset gate scales)."""
    h0 = h0.contiguous()
    out, gates, h_last = engine.train_forward(CELL)(x.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
                                                    None if b_hn is None else b_hn.contiguous(), h0,
                                                    None if image_term is None else image_term.contiguous(), lengths)
    return out, h_last, gates


def bptt(be, grad_out, grad_h_last, out, gates, h0, w_hh, lengths, sums=False):
    """-> ((dGx, dhn, dh0), each row's [dGx | dhn] summed over steps [B, 4H] or None: see backend_bptt)."""
    return backend_bptt(be.cells[CELL], (grad_out.contiguous(), grad_h_last.contiguous(), out, gates, h0, w_hh,
                                         lengths), out, gates.shape[2], sums)


@torch.library.custom_op("mmrnn::gru_fwd", mutates_args=())
def gru_fwd(xp: torch.Tensor, w_hh: torch.Tensor, b_hn: Optional[torch.Tensor], h0: torch.Tensor,
            image_term: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [T, B, H], h_last [B, H], gates [T, B, 4H]); gates are kept for backward."""
    be = _backends.select(backend, xp.device, xp.dtype, CELL)
    return forward(be, xp, w_hh, b_hn, h0, image_term, lengths, backend)


@gru_fwd.register_fake
def _gru_fwd_fake(xp, w_hh, b_hn, h0, image_term, lengths, backend):
    T, B, G = xp.shape
    H = G // 3
    return xp.new_empty(T, B, H), h0.new_empty(h0.shape), xp.new_empty(T, B, 4 * H)


@torch.library.custom_op("mmrnn::gru_bwd", mutates_args=())
def gru_bwd(grad_out: torch.Tensor, grad_h_last: torch.Tensor, out: torch.Tensor, gates: torch.Tensor,
            h0: torch.Tensor, w_hh: torch.Tensor, lengths: Optional[torch.Tensor],
            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BPTT -> (dGx [T, B, 3H] = dL/d(xp + image term), dhn [T, B, H] = dL/d(W_hn h + b_hn), dh0 [B, H])."""
    be = _backends.select(backend, out.device, out.dtype, CELL)
    return bptt(be, grad_out, grad_h_last, out, gates, h0, w_hh, lengths)[0]


@gru_bwd.register_fake
def _gru_bwd_fake(grad_out, grad_h_last, out, gates, h0, w_hh, lengths, backend):
    T, B, H = out.shape
    return out.new_empty(T, B, 3 * H), out.new_empty(out.shape), h0.new_empty(h0.shape)


def setup_context(ctx, inputs, output):
    xp, w_hh, b_hn, h0, image_term, lengths, backend = inputs
    out, _, gates = output
    ctx.save_for_backward(out, gates, w_hh, h0, lengths)  # the inputs themselves: their history serves double backward
    ctx.save_for_forward(out, gates, w_hh, h0, lengths)
    ctx.backend = backend
    ctx.image_static = image_term is not None and image_term.dim() == 2


def input_grads(ctx, grads, bptt, differentiable):
    """The gradients of (xp, w_hh, b_hn, h0, image_term, ...) from BPTT; bptt is the mmrnn::gru_bwd
    op (compiled graphs) or the backend's backward called directly (eager). differentiable: run the
    BPTT as torch ops instead (taking the gradient of gates too, which a second-order pass
    produces), so that these gradients have a history."""
    out, gates, w_hh, h0, lengths = ctx.saved_tensors
    H = out.shape[2]
    grad_out, grad_h = zeros_if_none(grads[0], out), zeros_if_none(grads[1], h0)
    need_xp, need_w, need_bhn, need_h0, need_img = ctx.needs_input_grad[:5]
    sums, want_sums = None, getattr(ctx, "wants_step_sums", False)
    if differentiable:
        dGx, dhn, dh0 = gru_reference_backward(grad_out, grad_h, out, gates, h0, w_hh, lengths, grads[2])
    else:
        # the step sums: [dGx | dhn] per row, for a static image term's gradient and b_hn's
        (dGx, dhn, dh0), sums = bptt(grad_out, grad_h, out, gates, h0.contiguous(), w_hh.contiguous(), lengths,
                                     ctx.backend, sums=need_bhn or (need_img and ctx.image_static) or want_sums)
        if want_sums:  # FusedInputOp computes the outer term's gradients (with b_hn's) from them
            ctx.step_sums = sums
    if getattr(ctx, "wants_recurrent_tail", False):  # FusedInputOp computes dW_hh with dW_ih: its n rows
        ctx.recurrent_tail = dhn
    d_w = None
    if need_w:
        engine = engine_of(ctx, differentiable)
        d_w = torch.cat([weight_grad(dGx[..., :2 * H], h0, out, engine), weight_grad(dhn, h0, out, engine)])
    d_bhn = None
    if need_bhn:
        d_bhn = dhn.sum((0, 1)) if sums is None else sums[:, 3 * H:].sum(0).to(dhn.dtype)
    return (dGx if need_xp else None, d_w, d_bhn, dh0 if need_h0 else None,
            image_grad(dGx, ctx.image_static, None if sums is None else sums[:, :3 * H]) if need_img else None,
            None, None)


def recurrent_operands(saved):
    """(h0, out) among the tensors setup_context saves: the h_{t-1} of the weight gradient. In
    FusedInputOp's joint pass ([dW_ih | dW_hh] from dA = [dr, dz, dn] and [x | h_{t-1}]) dW_hh's n
    rows read d(W_hn h + b_hn) instead of dn: input_grads leaves it as ctx.recurrent_tail when the
    context asks (ctx.wants_recurrent_tail)."""
    out, gates, w_hh, h0, lengths = saved
    return h0, out


def tangents(ctx, tangents):
    """Forward mode: the tangents of (out, h_last, gates) from those of (xp, w_hh, b_hn, h0, image_term, ...)."""
    out, gates, w_hh, h0, lengths = ctx.saved_tensors
    d_xp, d_w, d_b_hn, d_h0, d_img = tangents[:5]
    return gru_reference_jvp(out, gates, h0, w_hh, lengths, d_xp, d_w, d_b_hn, d_h0, d_img)


gru_fwd.register_autograd(registered_backward(sys.modules[__name__], torch.ops.mmrnn.gru_bwd),
                          setup_context=setup_context)


def gru_recurrence(xp, w_hh, b_hn=None, h0=None, image_term=None, lengths=None, backend="auto"):
    """The fused GRU recurrence over a whole time-major sequence; differentiable in xp, w_hh, b_hn,
    h0 and image_term. Returns (out [T, B, H], h_last [B, H]). Checks as rnn_recurrence."""
    if isinstance(xp, torch.Tensor) and xp.dim() == 3 and h0 is None:
        h0 = xp.new_zeros(xp.shape[1], xp.shape[2] // 3)
    compiling = torch.compiler.is_compiling()
    check_recurrence_args(xp, w_hh, b_hn, h0, image_term)
    lengths = prepare_lengths(lengths, xp, xp.shape[1], xp.shape[0], compiling)
    if compiling:
        return torch.ops.mmrnn.gru_fwd(xp, w_hh, b_hn, h0, image_term, lengths, backend)[:PUBLIC]
    infer = inference_forward(CELL, backend, (xp, w_hh, b_hn, h0, image_term))
    if infer is not None:
        return infer(xp.contiguous(), w_hh.contiguous(), None if b_hn is None else b_hn.contiguous(), h0.contiguous(),
                     None if image_term is None else image_term.contiguous(), lengths)
    return EagerOp.apply(xp, w_hh, b_hn, h0, image_term, lengths, backend, sys.modules[__name__])[:PUBLIC]


def gru_recurrence_fused(x, w_ih, image, w_img, b_ih, b_hh, w_hh, h0, lengths, backend, engine):
    """gru_recurrence(x @ w_ih^T, w_hh, b_hn, h0, outer_term(image, w_img, b_ih + [b_hr, b_hz, 0]), ...)
    with the input product inside the recurrence and the image term inside the op (b_hn: b_hh's last
    H entries), for the modules (their float32 CPU training; arguments already checked, lengths
    prepared): see FusedInputOp."""
    return FusedInputOp.apply(x, w_ih, image, w_img, b_ih, b_hh, w_hh, None, h0, None, lengths, backend,
                              sys.modules[__name__], engine)[:PUBLIC]
