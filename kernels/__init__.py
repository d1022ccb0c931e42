"""Triton kernels of the fused recurrences (installed as mmrnn_ext.kernels; see rnn.py and gated.py)."""
from .gated import GATED_FORMS, choose_gated_form, gru_backward, gru_forward, lstm_backward, lstm_forward
from .rnn import FORMS, Config, allow_tf32, choose_form, default_config, persistent_fits, rnn_backward, rnn_forward

__all__ = ["FORMS", "GATED_FORMS", "Config", "allow_tf32", "choose_form", "choose_gated_form", "default_config",
           "gru_backward", "gru_forward", "lstm_backward", "lstm_forward", "persistent_fits", "rnn_backward",
           "rnn_forward"]
