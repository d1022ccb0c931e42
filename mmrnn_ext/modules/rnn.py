"""mmrnn_ext.RNN / RNNCell: drop-ins for torch.nn.RNN / RNNCell whose every step also sees image features.

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh + W_img v      (v static, or v_t per step)
    h_t = tanh(a_t)    (relu with nonlinearity="relu")
"""
from __future__ import annotations

from torch import nn

from ..ops import rnn_recurrence
from ..ops.rnn import rnn_recurrence_fused
from ..reference import NONLINEARITIES
from .base import CellBase, RecurrentBase, _contiguous


class RNN(RecurrentBase):
    """Drop-in for torch.nn.RNN, plus ``image_size`` (features added to every step's pre-activation
    through ``weight_img_l{k}``) and ``backend`` ("auto", "cpp", "triton", "reference").

    forward(input, hx=None, image=None, lengths=None) -> (output, h_n), with nn.RNN's shapes:
    input [L, N, H_in] ([N, L, H_in] with batch_first), [L, H_in] unbatched, or a PackedSequence;
    image [N, V] or per step [L, N, V] ([N, L, V] with batch_first), unbatched [V] or [L, V];
    for a PackedSequence, image rows follow the original batch order, as hx does.
    lengths (optional, padded input only): int [N]; row n uses its first lengths[n] steps, its
    output is zero past them and h_n holds its state at its last valid step. image=None means no
    image term.
    """

    TORCH = nn.RNN
    CELL, GATES, STATES = "rnn", 1, 1
    REPR_CELL = (("nonlinearity", "tanh"),)

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 *, image_size=None, backend="auto"):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, device, dtype,
                         image_size=image_size, backend=backend)
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"

    def _recurrence(self, p, xp, image_term, states, lengths):
        out, h_last = rnn_recurrence(xp, p["weight_hh"], states[0], image_term, lengths, self.nonlinearity, self.backend)
        return out, (h_last,)

    def _fused_inference(self, engine, p):
        infer = engine.infer("rnn")

        def run(x, image_term, states, lengths):
            out, h_last = infer(x, p["weight_ih"].contiguous(), p["weight_hh"].contiguous(),
                                        states[0].contiguous(), _contiguous(image_term), lengths,
                                        self.nonlinearity == "relu")
            return out, (h_last,)

        return run

    def _fused_training(self, engine, p):
        def run(x, image, states, lengths):
            out, h_last = rnn_recurrence_fused(x, p["weight_ih"], image, p.get("weight_img"), p.get("bias_ih"),
                                               p.get("bias_hh"), p["weight_hh"], states[0], lengths,
                                               self.nonlinearity, self.backend, engine)
            return out, (h_last,)

        return run


class RNNCell(CellBase):
    """Drop-in for torch.nn.RNNCell, plus ``image_size`` (parameter ``weight_img``) and ``backend``.

    forward(input, hx=None, image=None) -> h'; input [N, H_in] or [H_in], hx [N, H] or [H],
    image [N, V] or [V]."""

    TORCH = nn.RNNCell
    CELL, GATES, STATES = "rnn", 1, 1
    REPR_CELL = (("nonlinearity", "tanh"),)

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None,
                 *, image_size=None, backend="auto"):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype, image_size=image_size, backend=backend)

    def _step(self, xp, image_term, states, amp):
        w_hh = self.weight_hh if amp is None else self.weight_hh.to(amp)
        _, h = rnn_recurrence(xp, w_hh, states[0], image_term, None, self.nonlinearity, self.backend)
        return [h]
