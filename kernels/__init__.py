"""Triton kernels of the fused recurrences (installed as mmrnn_ext.kernels): one file per cell (rnn.py,
lstm.py, gru.py: the @triton.jit kernels and their launchers), common.py (the jit building blocks the
three share) and launch.py (the launch planning they share: form by size, tiles, TF32 policy, grid)."""
from .gru import gru_backward, gru_forward
from .launch import FORMS, Config, allow_tf32, choose_form, default_config, persistent_fits
from .lstm import lstm_backward, lstm_forward
from .rnn import rnn_backward, rnn_forward

__all__ = ["FORMS", "Config", "allow_tf32", "choose_form", "default_config",
           "gru_backward", "gru_forward", "lstm_backward", "lstm_forward", "persistent_fits", "rnn_backward",
           "rnn_forward"]
