"""The fused recurrences as differentiable ops, one module per cell (rnn.py, lstm.py, gru.py) over
what they share (common.py)."""
from .common import InputError, InputTypeError, _describe, check_lengths
from .gru import gru_recurrence
from .lstm import lstm_recurrence
from .rnn import rnn_recurrence

__all__ = ["InputError", "InputTypeError", "check_lengths", "gru_recurrence", "lstm_recurrence", "rnn_recurrence", "_describe"]
