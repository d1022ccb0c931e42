"""mmrnn_ext.LSTM / LSTMCell: drop-ins for torch.nn.LSTM / LSTMCell whose every step also sees image
features, the same image term in every gate (order i, f, g, o):

    [i f g o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh + W_img v
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);   h_t = sigmoid(o) * tanh(c_t)
    (proj_size P > 0: h_t = W_hr (sigmoid(o) * tanh(c_t)))
"""
from __future__ import annotations

from torch import nn

from ..ops import InputError, InputTypeError, lstm_recurrence
from ..ops.lstm import lstm_recurrence_fused
from ..reference import lstm_recurrence_ref
from .base import CellBase, RecurrentBase, _contiguous


def _pair(hx, module):
    if not isinstance(hx, (tuple, list)):
        raise InputTypeError(f"hx: {module} expects a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise InputError(f"hx: {module} expects a tuple (h_0, c_0) of two tensors, got a {type(hx).__name__} of {len(hx)}")
    return tuple(hx)


class LSTM(RecurrentBase):
    """Drop-in for torch.nn.LSTM, plus ``image_size`` (features added to every gate's pre-activation
    through ``weight_img_l{k}``, shape [4 * hidden_size, image_size]) and ``backend``.

    forward(input, hx=None, image=None, lengths=None) -> (output, (h_n, c_n)), with nn.LSTM's shapes;
    image and lengths as mmrnn_ext.RNN's. With proj_size > 0 the recurrence runs the plain-PyTorch
    step loop (autograd through torch ops) on every device — correct, not fused."""

    TORCH = nn.LSTM
    CELL, GATES, STATES = "lstm", 4, 2

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, image_size=None, backend="auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size, device,
                         dtype, image_size=image_size, backend=backend)
        self.mode = "LSTM"

    def _state_sizes(self):
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _hx_tensors(self, hx):
        return _pair(hx, "LSTM")

    def _recurrence(self, p, xp, image_term, states, lengths):
        h0, c0 = states
        if self.proj_size > 0:
            out, h, c = lstm_recurrence_ref(xp, p["weight_hh"], h0, c0, image_term, lengths, p["weight_hr"])
        else:
            out, h, c = lstm_recurrence(xp, p["weight_hh"], h0, c0, image_term, lengths, self.backend)
        return out, (h, c)

    def _autocast_full(self):
        return (False, False, self.proj_size > 0)  # torch keeps c_n in float32 with proj_size

    def _step_kind(self):
        return None if self.proj_size > 0 else super()._step_kind()

    def _fused_inference(self, engine, p):
        if self.proj_size > 0:  # the projected state: the reference step loop (see _recurrence)
            return None
        infer = engine.infer("lstm")

        def run(x, image_term, states, lengths):
            out, h, c = infer(x, p["weight_ih"].contiguous(), p["weight_hh"].contiguous(),
                                       states[0].contiguous(), states[1].contiguous(), _contiguous(image_term),
                                       lengths)
            return out, (h, c)

        return run

    def _fused_training(self, engine, p):
        if self.proj_size > 0:  # the projected state: the reference step loop (see _recurrence)
            return None

        def run(x, image, states, lengths):
            out, h, c = lstm_recurrence_fused(x, p["weight_ih"], image, p.get("weight_img"), p.get("bias_ih"),
                                              p.get("bias_hh"), p["weight_hh"], states[0], states[1], lengths,
                                              self.backend, engine)
            return out, (h, c)

        return run


class LSTMCell(CellBase):
    """Drop-in for torch.nn.LSTMCell, plus ``image_size`` (parameter ``weight_img``,
    [4 * hidden_size, image_size]) and ``backend``.

    forward(input, hx=None, image=None) -> (h', c'); input [N, H_in] or [H_in], hx a tuple (h, c) of
    [N, H] or [H], image [N, V] or [V]."""

    TORCH = nn.LSTMCell
    CELL, GATES, STATES = "lstm", 4, 2
    AUTOCAST_FULL = (True, True)  # torch's LSTMCell returns float32 under autocast

    def _hx_tensors(self, hx):
        return _pair(hx, "LSTMCell")

    def _step(self, xp, image_term, states, amp):
        w_hh = self.weight_hh if amp is None else self.weight_hh.to(amp)
        _, h, c = lstm_recurrence(xp, w_hh, states[0], states[1], image_term, None, self.backend)
        return [h, c]
