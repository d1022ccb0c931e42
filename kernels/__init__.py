"""Triton kernels of the fused recurrence (installed as mmrnn_ext.kernels; see rnn.py)."""
from .rnn import FORMS, Config, allow_tf32, choose_form, default_config, persistent_fits, rnn_backward, rnn_forward

__all__ = ["FORMS", "Config", "allow_tf32", "choose_form", "default_config", "persistent_fits", "rnn_backward",
           "rnn_forward"]
