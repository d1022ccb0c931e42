"""mmrnn_ext.GRU / GRUCell: drop-ins for torch.nn.GRU / GRUCell whose every step also sees image
features, the same image term in every gate (order r, z, n), outside the reset product like the input:

    r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr + W_img_r v),  z likewise
    n = tanh(W_in x_t + b_in + W_img_n v + r * (W_hn h_{t-1} + b_hn));   h_t = (1 - z) * n + z * h_{t-1}
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import gru_recurrence
from ..ops.common import summed_bias
from ..ops.gru import gru_recurrence_fused
from .base import CellBase, RecurrentBase, _contiguous


def _outer_bias(b_ih, b_hh):
    """The biases outside the recurrent product: b_ih + [b_hr, b_hz, 0] (None without bias)."""
    return None if b_ih is None else summed_bias(b_ih, b_hh, b_hh.shape[0] // 3)


def _b_hn(b_hh):
    """The bias inside the reset product (None without bias)."""
    return None if b_hh is None else b_hh[2 * (b_hh.shape[0] // 3):]


class GRU(RecurrentBase):
    """Drop-in for torch.nn.GRU, plus ``image_size`` (features added to every gate's input side
    through ``weight_img_l{k}``, shape [3 * hidden_size, image_size]) and ``backend``.

    forward(input, hx=None, image=None, lengths=None) -> (output, h_n), with nn.GRU's shapes; image
    and lengths as mmrnn_ext.RNN's."""

    TORCH = nn.GRU
    CELL, GATES, STATES = "gru", 3, 1
    AUTOCAST_FULL = (True, True)  # torch's nn.GRU computes in bf16 but returns output and h_n in float32

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, image_size=None, backend="auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, device, dtype,
                         image_size=image_size, backend=backend)
        self.mode = "GRU"

    def _outer_bias(self, p):
        return _outer_bias(p.get("bias_ih"), p.get("bias_hh"))

    def _recurrence(self, p, xp, image_term, states, lengths):
        out, h = gru_recurrence(xp, p["weight_hh"], _b_hn(p.get("bias_hh")), states[0], image_term, lengths,
                                self.backend)
        return out, (h,)

    def _fused_inference(self, engine, p):
        if p["weight_ih"].dtype == torch.bfloat16:  # the GRU's fused tiles run float32 and float64 only
            return None
        infer = engine.infer("gru")
        b_hn = _b_hn(p.get("bias_hh"))

        def run(x, image_term, states, lengths):
            out, h = infer(x, p["weight_ih"].contiguous(), p["weight_hh"].contiguous(), _contiguous(b_hn),
                           states[0].contiguous(), _contiguous(image_term), lengths)
            return out, (h,)

        return run

    def _fused_training(self, engine, p):
        def run(x, image, states, lengths):
            out, h = gru_recurrence_fused(x, p["weight_ih"], image, p.get("weight_img"), p.get("bias_ih"),
                                          p.get("bias_hh"), p["weight_hh"], states[0], lengths, self.backend, engine)
            return out, (h,)

        return run


class GRUCell(CellBase):
    """Drop-in for torch.nn.GRUCell, plus ``image_size`` (parameter ``weight_img``,
    [3 * hidden_size, image_size]) and ``backend``.

    forward(input, hx=None, image=None) -> h'; input [N, H_in] or [H_in], hx [N, H] or [H],
    image [N, V] or [V]."""

    TORCH = nn.GRUCell
    CELL, GATES, STATES = "gru", 3, 1
    AUTOCAST_FULL = (True,)  # torch's GRUCell returns float32 under autocast

    def _outer_bias(self):
        return _outer_bias(self.bias_ih, self.bias_hh)

    def _step(self, xp, image_term, states, amp):
        b_hn = _b_hn(self.bias_hh)
        w_hh = self.weight_hh
        if amp is not None:
            w_hh, b_hn = w_hh.to(amp), None if b_hn is None else b_hn.to(amp)
        _, h = gru_recurrence(xp, w_hh, b_hn, states[0], image_term, None, self.backend)
        return [h]
