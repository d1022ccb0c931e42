"""mmrnn_ext: a fused multimodal RNN for PyTorch.

    mmrnn_ext.RNN / mmrnn_ext.RNNCell   drop-ins for torch.nn.RNN / RNNCell, plus image features
    mmrnn_ext.ops.rnn_recurrence        the fused recurrence as a differentiable op
    mmrnn_ext.backends()                which backends (cpp, triton, reference) run here, and why not
"""
from . import ops, reference
from ._backends import backend_for, backends
from .modules import RNN, RNNCell
from .ops import InputError, rnn_recurrence

__version__ = "0.1.0"
__all__ = ["RNN", "RNNCell", "InputError", "backend_for", "backends", "ops", "reference", "rnn_recurrence"]
