"""Triton kernels of the fused recurrences (installed as mmrnn_ext.kernels; see rnn.py and gated.py)."""
from .gated import gru_backward, gru_forward, lstm_backward, lstm_forward
from .rnn import FORMS, Config, allow_tf32, choose_form, default_config, persistent_fits, rnn_backward, rnn_forward

__all__ = ["FORMS", "Config", "allow_tf32", "choose_form", "default_config",
           "gru_backward", "gru_forward", "lstm_backward", "lstm_forward", "persistent_fits", "rnn_backward",
           "rnn_forward"]
