"""The LSTM recurrence as a differentiable op.

    out, h_last, c_last = lstm_recurrence(xp, w_hh, h0, c0, image_term=None, lengths=None)

Time-major shapes (see ``mmrnn_ext.reference`` for the full contract):
    xp [T, B, 4H] (gates i, f, g, o), w_hh [4H, H], h0, c0 [B, H], image_term [B, 4H] or [T, B, 4H],
    lengths int64 [B] -> out [T, B, H] (zero past each row's length), h_last, c_last [B, H]

Registered as the torch.library custom ops mmrnn::lstm_fwd and mmrnn::lstm_bwd. Backward saves the
outputs, the cell states and the activated gates (6H per step and row: what nn.LSTM's fused
kernels keep, 4H gates + c + h), h0, c0 and W_hh — never the projected input; tanh(c_t) is
recomputed in the backward pass. dW_hh is one pass over all steps after the reverse loop: on the CPU
engine in float32 first-order backward (with dW_ih, in the modules' fused training), torch's GEMM
otherwise.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .. import _backends
from ..reference import lstm_reference_backward, lstm_reference_jvp
from .common import (EagerOp, FusedInputOp, backend_bptt, check_image_term, check_like, check_xp, engine_of,
                     image_grad, inference_forward, last_state, prepare_lengths, registered_backward, weight_grad,
                     zeros_if_none)

CELL, PUBLIC = "lstm", 3
# FusedInputOp: where the outer term goes among the op's inputs after xp; no bias inside the product
IMAGE_SLOT, INNER_BIAS_SLOT = 3, None


def check_recurrence_args(xp, w_hh, h0, c0, image_term):
    T, B, H = check_xp(xp, 4)
    check_like("w_hh", w_hh, (4 * H, H), xp)
    check_like("h0", h0, (B, H), xp)
    check_like("c0", c0, (B, H), xp)
    check_image_term(image_term, T, B, 4 * H, xp)


def forward(be, xp, w_hh, h0, c0, image_term, lengths, backend):
    h0, c0 = h0.contiguous(), c0.contiguous()
    out, c_all, gates = be.cells[CELL].forward(xp.contiguous(), w_hh.contiguous(), h0, c0,
                                               None if image_term is None else image_term.contiguous(), lengths)
    return out, last_state(out, h0, lengths), last_state(c_all, c0, lengths), c_all, gates


def fused_forward(engine, x, w_ih, w_hh, h0, c0, image_term, lengths, backend):
    """forward's outputs for xp = x @ w_ih^T, the input product inside each step's tile."""
    h0, c0 = h0.contiguous(), c0.contiguous()
    out, c_all, gates, h_last, c_last = engine.train_forward(CELL)(
        x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), h0, c0, None if image_term is None else image_term.contiguous(),
        lengths)
    return out, h_last, c_last, c_all, gates


def bptt(be, grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths, sums=False):
    """-> ((dG, dh0, dc0), each row's dG summed over steps [B, 4H] or None: see backend_bptt)."""
    return backend_bptt(be.cells[CELL], (grad_out.contiguous(), grad_h_last.contiguous(), grad_c_last.contiguous(),
                                         out, c_all, gates, h0, c0, w_hh, lengths), out, gates.shape[2], sums)


@torch.library.custom_op("mmrnn::lstm_fwd", mutates_args=())
def lstm_fwd(xp: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
             image_term: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out [T, B, H], h_last [B, H], c_last [B, H], c_all [T, B, H], gates [T, B, 4H]); the last
    two are kept for backward."""
    be = _backends.select(backend, xp.device, xp.dtype, CELL)
    return forward(be, xp, w_hh, h0, c0, image_term, lengths, backend)


@lstm_fwd.register_fake
def _lstm_fwd_fake(xp, w_hh, h0, c0, image_term, lengths, backend):
    T, B, G = xp.shape
    H = G // 4
    return (xp.new_empty(T, B, H), h0.new_empty(h0.shape), c0.new_empty(c0.shape), xp.new_empty(T, B, H),
            xp.new_empty(xp.shape))


@torch.library.custom_op("mmrnn::lstm_bwd", mutates_args=())
def lstm_bwd(grad_out: torch.Tensor, grad_h_last: torch.Tensor, grad_c_last: torch.Tensor, out: torch.Tensor,
             c_all: torch.Tensor, gates: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
             lengths: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BPTT -> (dG [T, B, 4H], dh0 [B, H], dc0 [B, H]), dG_t = dL/d(pre-activation gates at t)."""
    be = _backends.select(backend, out.device, out.dtype, CELL)
    return bptt(be, grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths)[0]


@lstm_bwd.register_fake
def _lstm_bwd_fake(grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths, backend):
    return gates.new_empty(gates.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def setup_context(ctx, inputs, output):
    xp, w_hh, h0, c0, image_term, lengths, backend = inputs
    out, _, _, c_all, gates = output
    ctx.save_for_backward(out, c_all, gates, w_hh, h0, c0, lengths)  # inputs themselves: their history serves double backward
    ctx.save_for_forward(out, c_all, gates, w_hh, h0, c0, lengths)
    ctx.backend = backend
    ctx.image_static = image_term is not None and image_term.dim() == 2


def input_grads(ctx, grads, bptt, differentiable):
    """The gradients of (xp, w_hh, h0, c0, image_term, ...) from BPTT; bptt is the mmrnn::lstm_bwd
    op (compiled graphs) or the backend's backward called directly (eager). differentiable: run the
    BPTT as torch ops instead (taking the gradients of c_all and gates too, which a second-order
    pass produces), so that these gradients have a history."""
    out, c_all, gates, w_hh, h0, c0, lengths = ctx.saved_tensors
    grad_out, grad_h, grad_c = zeros_if_none(grads[0], out), zeros_if_none(grads[1], h0), zeros_if_none(grads[2], c0)
    need_xp, need_w, need_h0, need_c0, need_img = ctx.needs_input_grad[:5]
    sums, want_sums = None, getattr(ctx, "wants_step_sums", False)
    if differentiable:
        dG, dh0, dc0 = lstm_reference_backward(grad_out, grad_h, grad_c, out, c_all, gates, h0, c0, w_hh, lengths,
                                               grads[3], grads[4])
    else:
        (dG, dh0, dc0), sums = bptt(grad_out, grad_h, grad_c, out, c_all, gates, h0.contiguous(), c0.contiguous(),
                                    w_hh.contiguous(), lengths, ctx.backend,
                                    sums=need_img and ctx.image_static or want_sums)
        if want_sums:  # FusedInputOp computes the outer term's gradients from them
            ctx.step_sums = sums
    d_w = weight_grad(dG, h0, out, engine_of(ctx, differentiable)) if need_w else None
    return (dG if need_xp else None, d_w, dh0 if need_h0 else None,
            dc0 if need_c0 else None, image_grad(dG, ctx.image_static, sums) if need_img else None, None, None)


def recurrent_operands(saved):
    """(h0, out) among the tensors setup_context saves: the h_{t-1} of the weight gradient."""
    out, c_all, gates, w_hh, h0, c0, lengths = saved
    return h0, out


def tangents(ctx, tangents):
    """Forward mode: the tangents of (out, h_last, c_last, c_all, gates) from those of (xp, w_hh, h0, c0,
    image_term, ...)."""
    out, c_all, gates, w_hh, h0, c0, lengths = ctx.saved_tensors
    d_xp, d_w, d_h0, d_c0, d_img = tangents[:5]
    return lstm_reference_jvp(out, c_all, gates, h0, c0, w_hh, lengths, d_xp, d_w, d_h0, d_c0, d_img)


lstm_fwd.register_autograd(registered_backward(sys.modules[__name__], torch.ops.mmrnn.lstm_bwd),
                           setup_context=setup_context)


def lstm_recurrence(xp, w_hh, h0=None, c0=None, image_term=None, lengths=None, backend="auto"):
    """The fused LSTM recurrence over a whole time-major sequence; differentiable in xp, w_hh, h0, c0
    and image_term. Returns (out [T, B, H], h_last [B, H], c_last [B, H]). Checks as rnn_recurrence."""
    if isinstance(xp, torch.Tensor) and xp.dim() == 3:
        zeros = lambda: xp.new_zeros(xp.shape[1], xp.shape[2] // 4)  # noqa: E731
        h0 = zeros() if h0 is None else h0
        c0 = zeros() if c0 is None else c0
    compiling = torch.compiler.is_compiling()
    check_recurrence_args(xp, w_hh, h0, c0, image_term)
    lengths = prepare_lengths(lengths, xp, xp.shape[1], xp.shape[0], compiling)
    if compiling:
        return torch.ops.mmrnn.lstm_fwd(xp, w_hh, h0, c0, image_term, lengths, backend)[:PUBLIC]
    infer = inference_forward(CELL, backend, (xp, w_hh, h0, c0, image_term))
    if infer is not None:
        return infer(xp.contiguous(), w_hh.contiguous(), h0.contiguous(), c0.contiguous(),
                     None if image_term is None else image_term.contiguous(), lengths)
    return EagerOp.apply(xp, w_hh, h0, c0, image_term, lengths, backend, sys.modules[__name__])[:PUBLIC]


def lstm_recurrence_fused(x, w_ih, image, w_img, b_ih, b_hh, w_hh, h0, c0, lengths, backend, engine):
    """lstm_recurrence(x @ w_ih^T, w_hh, h0, c0, outer_term(image, w_img, b_ih + b_hh), ...) with the
    input product inside the recurrence and the image term inside the op, for the modules (their
    float32 CPU training; arguments already checked, lengths prepared): see FusedInputOp."""
    return FusedInputOp.apply(x, w_ih, image, w_img, b_ih, b_hh, w_hh, h0, c0, None, lengths, backend,
                              sys.modules[__name__], engine)[:PUBLIC]
