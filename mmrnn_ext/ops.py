"""The fused recurrence as a differentiable op.

    out, h_last = rnn_recurrence(xp, w_hh, h0, image_term=None, lengths=None, nonlinearity="tanh")

Time-major shapes (see ``mmrnn_ext.reference`` for the full contract):
    xp [T, B, H], w_hh [H, H], h0 [B, H], image_term [B, H] or [T, B, H], lengths int64 [B]
    -> out [T, B, H] (zero past each row's length), h_last [B, H] (state at each row's last step)

Registered as the torch.library custom ops mmrnn::rnn_fwd and mmrnn::rnn_bwd (see below).

Casting policy: every backend accumulates in float32 (float64 for float64 inputs) and returns the
input dtype. Backward saves only the outputs, h0 and W_hh (f' comes from h: 1 - h^2 for tanh), never
the projected input; dW_hh is one GEMM over all steps after the reverse loop.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _backends
from .reference import NONLINEARITIES


class InputError(ValueError, RuntimeError):
    """A call with a wrong argument. Derives from both exception types that torch.nn.RNN raises for
    bad input, so code written against nn.RNN catches it unchanged."""


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def check_recurrence_args(xp, w_hh, h0, image_term, lengths, nonlinearity, check_values=True):
    if nonlinearity not in NONLINEARITIES:
        raise InputError(f"nonlinearity: expected one of {NONLINEARITIES}, got {nonlinearity!r}")
    if not isinstance(xp, torch.Tensor) or xp.dim() != 3:
        raise InputError(f"xp: expected a 3-D tensor [T, B, H], got {_describe(xp) if isinstance(xp, torch.Tensor) else type(xp).__name__}")
    T, B, H = xp.shape
    if not xp.is_floating_point():
        raise InputError(f"xp: expected a floating-point tensor, got {xp.dtype}")
    expected = {"w_hh": (H, H), "h0": (B, H)}
    for name, t in (("w_hh", w_hh), ("h0", h0)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected[name]:
            got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name}: expected shape {expected[name]}, got {got}")
    if image_term is not None and tuple(image_term.shape) not in ((B, H), (T, B, H)):
        raise InputError(f"image_term: expected shape {(B, H)} (static) or {(T, B, H)} (per step), got {tuple(image_term.shape)}")
    for name, t in (("w_hh", w_hh), ("h0", h0), ("image_term", image_term)):
        if t is None:
            continue
        if t.dtype != xp.dtype:
            raise InputError(f"{name}: expected dtype {xp.dtype} (the dtype of xp), got {t.dtype}")
        if t.device != xp.device:
            raise InputError(f"{name}: expected device {xp.device} (the device of xp), got {t.device}")
    if lengths is not None:
        check_lengths(lengths, B, T, check_values)


def check_lengths(lengths, B: int, T: int, check_values: bool = True) -> None:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != B:
        got = _describe(lengths) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise InputError(f"lengths: expected a 1-D integer tensor of {B} entries (one per batch row), got {got}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise InputError(f"lengths: expected an integer tensor, got {lengths.dtype}")
    if check_values and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            raise InputError(f"lengths: expected values in [0, {T}] (the sequence length), got min {lo}, max {hi}")


def _h_last(out, h0, lengths):
    """The state at each row's last valid step (h0 for rows of length 0); never a view of out or h0."""
    T = out.shape[0]
    if T == 0:
        return h0.clone()
    if lengths is None:
        return out[T - 1].clone()
    idx = (lengths - 1).clamp(min=0).view(1, -1, 1).expand(1, -1, out.shape[2])
    return torch.where((lengths > 0).unsqueeze(1), out.gather(0, idx).squeeze(0), h0)


# The fused recurrence as torch.library custom ops: torch.compile sees each as one opaque node (no
# graph break, no unrolled loop), and its fake (meta) implementation gives shapes and dtypes only.
# The backend travels as a string and is resolved by the one dispatch point, per device and dtype.

@torch.library.custom_op("mmrnn::rnn_fwd", mutates_args=())
def rnn_fwd(xp: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, image_term: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], nonlinearity: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [T, B, H], h_last [B, H])."""
    return _forward(_backends.select(backend, xp.device, xp.dtype), xp, w_hh, h0, image_term, lengths, nonlinearity)


def _forward(be, xp, w_hh, h0, image_term, lengths, nonlinearity):
    h0 = h0.contiguous()
    out = be.forward(xp.contiguous(), w_hh.contiguous(), h0, None if image_term is None else image_term.contiguous(),
                     lengths, nonlinearity)
    return out, _h_last(out, h0, lengths)


@rnn_fwd.register_fake
def _rnn_fwd_fake(xp, w_hh, h0, image_term, lengths, nonlinearity, backend):
    return xp.new_empty(xp.shape), h0.new_empty(h0.shape)


@torch.library.custom_op("mmrnn::rnn_bwd", mutates_args=())
def rnn_bwd(grad_out: torch.Tensor, grad_h_last: torch.Tensor, out: torch.Tensor, h0: torch.Tensor,
            w_hh: torch.Tensor, lengths: Optional[torch.Tensor], nonlinearity: str,
            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BPTT -> (dA [T, B, H], dh0 [B, H]), dA_t = dL/da_t."""
    return _bptt(_backends.select(backend, out.device, out.dtype), grad_out, grad_h_last, out, h0, w_hh, lengths,
                 nonlinearity)


def _bptt(be, grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity):
    return be.backward(grad_out.contiguous(), grad_h_last.contiguous(), out, h0, w_hh, lengths, nonlinearity)


@rnn_bwd.register_fake
def _rnn_bwd_fake(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, backend):
    return out.new_empty(out.shape), h0.new_empty(h0.shape)


def _setup_context(ctx, inputs, output):
    xp, w_hh, h0, image_term, lengths, nonlinearity, backend = inputs
    out, _ = output
    ctx.save_for_backward(out, w_hh.contiguous(), h0.contiguous(), lengths)
    ctx.nonlinearity, ctx.backend = nonlinearity, backend
    ctx.image_static = image_term is not None and image_term.dim() == 2


def _backward(ctx, grad_out, grad_h_last):
    return _input_grads(ctx, grad_out, grad_h_last, torch.ops.mmrnn.rnn_bwd)


def _input_grads(ctx, grad_out, grad_h_last, bptt):
    """The gradients of (xp, w_hh, h0, image_term) from BPTT's dA = dL/da and dh0; bptt is the
    mmrnn::rnn_bwd op (compiled graphs) or the backend's backward called directly (eager)."""
    out, w_hh, h0, lengths = ctx.saved_tensors
    T, B, H = out.shape
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_h_last = torch.zeros_like(h0) if grad_h_last is None else grad_h_last
    dA, dh0 = bptt(grad_out, grad_h_last, out, h0, w_hh, lengths, ctx.nonlinearity, ctx.backend)
    d_xp = d_w = d_h0 = d_img = None
    need_xp, need_w, need_h0, need_img = ctx.needs_input_grad[:4]
    if need_xp:
        d_xp = dA
    if need_w:
        # dW_hh = sum_t dA_t^T h_{t-1}: one GEMM over steps 1..T-1 (h_{t-1} = out[t-1]) plus h0's.
        # Rows past their length have dA = 0, so the zeros stored there never contribute.
        d_w = dA[0].t().mm(h0) if T > 0 else torch.zeros_like(w_hh)
        if T > 1:
            d_w = d_w.addmm(dA[1:].reshape(-1, H).t(), out[:-1].reshape(-1, H))
    if need_h0:
        d_h0 = dh0
    if need_img:
        d_img = dA.sum(0) if ctx.image_static else dA
    return d_xp, d_w, d_h0, d_img, None, None, None


rnn_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerRecurrence(torch.autograd.Function):
    """The same forward and backward as mmrnn::rnn_fwd and its registered autograd, for eager calls:
    the custom op's Python dispatch cost ~0.35 ms of host time per training step (measured on a
    2-core VM), which a small GPU problem cannot hide. torch.compile traces the custom op instead
    (see rnn_recurrence)."""

    @staticmethod
    def forward(ctx, xp, w_hh, h0, image_term, lengths, nonlinearity, backend):
        be = _backends.select(backend, xp.device, xp.dtype)
        out, h_last = _forward(be, xp, w_hh, h0, image_term, lengths, nonlinearity)
        _setup_context(ctx, (xp, w_hh, h0, image_term, lengths, nonlinearity, backend), (out, h_last))
        ctx.be = be
        return out, h_last

    @staticmethod
    def backward(ctx, grad_out, grad_h_last):
        def bptt(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, backend):
            return _bptt(ctx.be, grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity)

        return _input_grads(ctx, grad_out, grad_h_last, bptt)


def rnn_recurrence(xp, w_hh, h0=None, image_term=None, lengths=None, nonlinearity="tanh", backend="auto"):
    """The fused recurrence over a whole time-major sequence; differentiable in xp, w_hh, h0 and
    image_term. Returns (out [T, B, H], h_last [B, H]).

    Eagerly, every argument is checked (lengths' values included) and the backend resolved before
    any kernel runs. Under torch.compile the value checks that would need a device-to-host sync are
    left to the backend kernels' own checks, so the op traces without a graph break."""
    if isinstance(xp, torch.Tensor) and xp.dim() == 3 and h0 is None:
        h0 = xp.new_zeros(xp.shape[1], xp.shape[2])
    compiling = torch.compiler.is_compiling()
    check_recurrence_args(xp, w_hh, h0, image_term, lengths, nonlinearity, check_values=not compiling)
    if lengths is not None:
        lengths = lengths.to(device=xp.device, dtype=torch.int64).contiguous()
    if compiling:
        return torch.ops.mmrnn.rnn_fwd(xp, w_hh, h0, image_term, lengths, nonlinearity, backend)
    return _EagerRecurrence.apply(xp, w_hh, h0, image_term, lengths, nonlinearity, backend)
