"""The package's error types, at the bottom of its import graph (this module imports nothing of the
package), so that the dispatch point (_backends) and the ops both raise them without importing each
other. Public as mmrnn_ext.InputError (and mmrnn_ext.ops.InputError, ops.common's)."""


class InputError(ValueError, RuntimeError):
    """A call with a wrong argument. Derives from both exception types that torch.nn.RNN raises for
    bad input, so code written against nn.RNN catches it unchanged."""


class InputTypeError(InputError, TypeError):
    """A wrong argument where torch raises TypeError (e.g. an LSTM cell's hx given as a tensor)."""
