"""The RNN recurrence as a differentiable op.

    out, h_last = rnn_recurrence(xp, w_hh, h0, image_term=None, lengths=None, nonlinearity="tanh")

Time-major shapes (see ``mmrnn_ext.reference`` for the full contract):
    xp [T, B, H], w_hh [H, H], h0 [B, H], image_term [B, H] or [T, B, H], lengths int64 [B]
    -> out [T, B, H] (zero past each row's length), h_last [B, H] (state at each row's last step)

Registered as the torch.library custom ops mmrnn::rnn_fwd and mmrnn::rnn_bwd. Backward saves only
the outputs, h0 and W_hh (f' comes from h: 1 - h^2 for tanh), never the projected input; dW_hh is
one pass over all steps after the reverse loop: on the CPU engine in float32 first-order backward
(with dW_ih, in the modules' fused training), torch's GEMM otherwise.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .. import _backends
from ..reference import NONLINEARITIES, reference_backward, rnn_reference_jvp
from .common import (EagerOp, FusedInputOp, InputError, backend_bptt, check_image_term, check_like, check_xp,
                     engine_of, image_grad, inference_forward, last_state, prepare_lengths, registered_backward,
                     weight_grad, zeros_if_none)

CELL, PUBLIC = "rnn", 2
# FusedInputOp: where the outer term goes among the op's inputs after xp; no bias inside the product
IMAGE_SLOT, INNER_BIAS_SLOT = 2, None


def check_recurrence_args(xp, w_hh, h0, image_term, nonlinearity):
    if nonlinearity not in NONLINEARITIES:
        raise InputError(f"nonlinearity: expected one of {NONLINEARITIES}, got {nonlinearity!r}")
    T, B, H = check_xp(xp, 1)
    check_like("w_hh", w_hh, (H, H), xp)
    check_like("h0", h0, (B, H), xp)
    check_image_term(image_term, T, B, H, xp)


def forward(be, xp, w_hh, h0, image_term, lengths, nonlinearity, backend):
    h0 = h0.contiguous()
    out = be.cells[CELL].forward(xp.contiguous(), w_hh.contiguous(), h0,
                                 None if image_term is None else image_term.contiguous(), lengths, nonlinearity)
    return out, last_state(out, h0, lengths)


def fused_forward(engine, x, w_ih, w_hh, h0, image_term, lengths, nonlinearity, backend):
    """forward's outputs for xp = x @ w_ih^T, the input product inside each step's tile (the RNN
    saves only its outputs, so the inference kernel serves training too; its h_last is the state at
    each row's last step, as last_state's)."""
    out, h_last = engine.train_forward(CELL)(x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), h0.contiguous(),
                                             None if image_term is None else image_term.contiguous(), lengths,
                                             nonlinearity == "relu")
    return out, h_last


def bptt(be, grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, sums=False):
    """-> ((dA, dh0), each row's dA summed over steps [B, H] or None: see backend_bptt)."""
    return backend_bptt(be.cells[CELL], (grad_out.contiguous(), grad_h_last.contiguous(), out, h0, w_hh, lengths,
                                         nonlinearity), out, out.shape[2], sums)


@torch.library.custom_op("mmrnn::rnn_fwd", mutates_args=())
def rnn_fwd(xp: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, image_term: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], nonlinearity: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [T, B, H], h_last [B, H])."""
    be = _backends.select(backend, xp.device, xp.dtype, CELL)
    return forward(be, xp, w_hh, h0, image_term, lengths, nonlinearity, backend)


@rnn_fwd.register_fake
def _rnn_fwd_fake(xp, w_hh, h0, image_term, lengths, nonlinearity, backend):
    return xp.new_empty(xp.shape), h0.new_empty(h0.shape)


@torch.library.custom_op("mmrnn::rnn_bwd", mutates_args=())
def rnn_bwd(grad_out: torch.Tensor, grad_h_last: torch.Tensor, out: torch.Tensor, h0: torch.Tensor,
            w_hh: torch.Tensor, lengths: Optional[torch.Tensor], nonlinearity: str,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BPTT -> (dA [T, B, H], dh0 [B, H]), dA_t = dL/da_t."""
    be = _backends.select(backend, out.device, out.dtype, CELL)
    return bptt(be, grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity)[0]


@rnn_bwd.register_fake
def _rnn_bwd_fake(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, backend):
    return out.new_empty(out.shape), h0.new_empty(h0.shape)


def setup_context(ctx, inputs, output):
    xp, w_hh, h0, image_term, lengths, nonlinearity, backend = inputs
    out, _ = output
    ctx.save_for_backward(out, w_hh, h0, lengths)  # the inputs themselves: their history serves double backward
    ctx.save_for_forward(out, w_hh, h0, lengths)
    ctx.nonlinearity, ctx.backend = nonlinearity, backend
    ctx.image_static = image_term is not None and image_term.dim() == 2


def input_grads(ctx, grads, bptt, differentiable):
    """The gradients of (xp, w_hh, h0, image_term, ...) from BPTT's dA = dL/da and dh0; bptt is the
    mmrnn::rnn_bwd op (compiled graphs) or the backend's backward called directly (eager).
    differentiable: run the BPTT as torch ops instead, so that these gradients have a history."""
    out, w_hh, h0, lengths = ctx.saved_tensors
    grad_out, grad_h_last = zeros_if_none(grads[0], out), zeros_if_none(grads[1], h0)
    need_xp, need_w, need_h0, need_img = ctx.needs_input_grad[:4]
    sums, want_sums = None, getattr(ctx, "wants_step_sums", False)
    if differentiable:
        dA, dh0 = reference_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, ctx.nonlinearity)
    else:
        (dA, dh0), sums = bptt(grad_out, grad_h_last, out, h0.contiguous(), w_hh.contiguous(), lengths,
                               ctx.nonlinearity, ctx.backend, sums=need_img and ctx.image_static or want_sums)
        if want_sums:  # FusedInputOp computes the outer term's gradients from them
            ctx.step_sums = sums
    d_w = weight_grad(dA, h0, out, engine_of(ctx, differentiable)) if need_w else None
    return (dA if need_xp else None, d_w, dh0 if need_h0 else None,
            image_grad(dA, ctx.image_static, sums) if need_img else None, None, None, None)


def recurrent_operands(saved):
    """(h0, out) among the tensors setup_context saves: the h_{t-1} of the weight gradient."""
    out, w_hh, h0, lengths = saved
    return h0, out


def tangents(ctx, tangents):
    """Forward mode: (d_out, d_h_last) from the tangents of (xp, w_hh, h0, image_term, ...)."""
    out, w_hh, h0, lengths = ctx.saved_tensors
    d_xp, d_w, d_h0, d_img = tangents[:4]
    return rnn_reference_jvp(out, h0, w_hh, lengths, ctx.nonlinearity, d_xp, d_w, d_h0, d_img)


rnn_fwd.register_autograd(registered_backward(sys.modules[__name__], torch.ops.mmrnn.rnn_bwd),
                          setup_context=setup_context)


def rnn_recurrence(xp, w_hh, h0=None, image_term=None, lengths=None, nonlinearity="tanh", backend="auto"):
    """The fused RNN recurrence over a whole time-major sequence; differentiable in xp, w_hh, h0 and
    image_term. Returns (out [T, B, H], h_last [B, H]).

    Eagerly, every argument is checked (lengths' values included) and the backend resolved before
    any kernel runs. Under torch.compile the value checks that would need a device-to-host sync are
    left to the backend kernels' own checks, so the op traces without a graph break."""
    if isinstance(xp, torch.Tensor) and xp.dim() == 3 and h0 is None:
        h0 = xp.new_zeros(xp.shape[1], xp.shape[2])
    compiling = torch.compiler.is_compiling()
    check_recurrence_args(xp, w_hh, h0, image_term, nonlinearity)
    lengths = prepare_lengths(lengths, xp, xp.shape[1], xp.shape[0], compiling)
    if compiling:
        return torch.ops.mmrnn.rnn_fwd(xp, w_hh, h0, image_term, lengths, nonlinearity, backend)
    infer = inference_forward(CELL, backend, (xp, w_hh, h0, image_term))
    if infer is not None:
        return infer(xp.contiguous(), w_hh.contiguous(), h0.contiguous(),
                     None if image_term is None else image_term.contiguous(), lengths, nonlinearity)
    return EagerOp.apply(xp, w_hh, h0, image_term, lengths, nonlinearity, backend, sys.modules[__name__])[:PUBLIC]


def rnn_recurrence_fused(x, w_ih, image, w_img, b_ih, b_hh, w_hh, h0, lengths, nonlinearity, backend, engine):
    """rnn_recurrence(x @ w_ih^T, w_hh, h0, outer_term(image, w_img, b_ih + b_hh), ...) with the input
    product inside the recurrence and the image term inside the op, for the modules (their float32
    CPU training; arguments already checked, lengths prepared): see FusedInputOp."""
    return FusedInputOp.apply(x, w_ih, image, w_img, b_ih, b_hh, w_hh, h0, None, lengths, nonlinearity, backend,
                              sys.modules[__name__], engine)[:PUBLIC]
