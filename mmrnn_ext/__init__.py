"""mmrnn_ext: a fused multimodal RNN, LSTM and GRU for PyTorch.

    mmrnn_ext.RNN / LSTM / GRU          drop-ins for torch.nn.RNN / LSTM / GRU, plus image features
    mmrnn_ext.RNNCell / LSTMCell / GRUCell   drop-ins for torch's cells, plus image features
    mmrnn_ext.rnn_recurrence / lstm_recurrence / gru_recurrence   the fused recurrences as differentiable ops
    mmrnn_ext.from_torch(module, image_size=None)   torch's module or cell -> ours (same Parameters); back: .to_torch()
    mmrnn_ext.convert(model)            swap every torch recurrent module inside a model, in place -> (model, report)
    mmrnn_ext.load_exported(path)       a shipped model.pt2 / model.onnx whose calls check their inputs
    mmrnn_ext.backends()                which backends (cpp, triton, reference) run here, for which cells, and why not
    mmrnn_ext.cpu_cache() / empty_cache()   the C++ engine's cache of large CPU buffers: its sizes / free it
"""
from . import ops, reference
from ._backends import backend_for, backends, cpu_cache, empty_cache
from .convert import ConversionReport, convert, from_torch
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .ops import InputError, gru_recurrence, lstm_recurrence, rnn_recurrence
from .shipped import ExportedModel, load_exported

__version__ = "0.1.0"
__all__ = ["ConversionReport", "ExportedModel", "GRU", "GRUCell", "InputError", "LSTM", "LSTMCell", "RNN", "RNNCell",
           "backend_for", "backends", "convert", "cpu_cache", "empty_cache", "from_torch", "gru_recurrence",
           "load_exported", "lstm_recurrence", "ops", "reference", "rnn_recurrence"]
