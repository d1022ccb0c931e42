"""The drop-in modules, one file per cell (rnn.py, lstm.py, gru.py) over the shared layer loop and
cell checks (base.py)."""
from .base import _time_reverse
from .gru import GRU, GRUCell
from .lstm import LSTM, LSTMCell
from .rnn import RNN, RNNCell

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "_time_reverse"]
