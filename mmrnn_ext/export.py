"""Shipping models: what mmrnn_ext's modules and cells become under torch.onnx.export.

Under ``torch.onnx.export(..., dynamo=True)`` every layer (both directions) becomes ONE native ONNX
node — RNN, LSTM or GRU — that ONNX Runtime runs with its own kernels. The image term is exactly
extra input columns: W_img v is W' [x_t, v] with W' = [W_ih | W_img], so the node's X is the input
with the image concatenated onto every step (static image: repeated over time) and its W the input
and image weights side by side. Gates are reordered from torch's order to ONNX's (LSTM i f g o ->
i o f c, GRU r z n -> z r h); the GRU node keeps PyTorch's reset-after form (linear_before_reset=1,
b_hn inside the reset product); ``lengths`` become the node's sequence_lens (the same semantics:
zero outputs past a row's length, the final state at its last valid step, the reverse direction
over each row's own valid steps). torch.export and AOTInductor keep the mmrnn::* custom ops (see
mmrnn_ext.ops) and need nothing from here.

What ONNX cannot express is refused by name before the exporter runs: LSTM proj_size (ONNX's LSTM
has no projection), PackedSequence input (pass the padded batch and ``lengths``), autocast, and the
TorchScript-based exporter (dynamo=False).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .ops import InputError

# ONNX's gate order, as indices of torch's gate chunks.
_ONNX_GATES = {"rnn": (0,), "lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}
_ONNX_OP = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}

SHIP_HINT = ("ship it with torch.onnx.export(..., dynamo=True) (ONNX Runtime) or torch.export.export "
             "(+ AOTInductor)")


def _dynamo_exporter_flag() -> bool:
    """torch.onnx.export(dynamo=True)'s own flag. torch.onnx.is_in_onnx_export() reads it too, but
    TorchDynamo folds that function to False, so under the exporter's strict-mode capture (its
    fallback when the first capture fails) only the flag itself still says that ONNX is the target."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def onnx_exporting() -> bool:
    """Whether a module is being traced by torch.onnx.export (either exporter). Every forward asks,
    so the exporters' flags are read where they live (two dict lookups; torch.onnx.is_in_onnx_export
    imports its modules on each call, ~2 us) — the public function where a torch keeps them elsewhere."""
    if _dynamo_exporter_flag():
        return True
    if torch.compiler.is_compiling():  # the TorchScript-based exporter never runs under TorchDynamo
        return False
    legacy = sys.modules.get("torch.onnx._internal.torchscript_exporter._globals")
    if legacy is not None and hasattr(legacy, "GLOBALS"):
        return bool(legacy.GLOBALS.in_onnx_export)
    return torch.onnx.is_in_onnx_export()


def _refuse(module, what: str, why: str):
    raise InputError(f"{what}: {type(module).__name__} cannot be exported to ONNX {why}")


def check_onnx_exportable(module, *, packed: bool = False, amp=None) -> None:
    """The cases ONNX cannot express, refused by name before any exporter message."""
    if not hasattr(torch.onnx, "ops"):
        _refuse(module, "torch.onnx.export", f"with torch {torch.__version__}: its ONNX nodes need torch.onnx.ops "
                "(torch >= 2.8)")
    if not _dynamo_exporter_flag():
        _refuse(module, "torch.onnx.export", "by the TorchScript-based exporter (dynamo=False); pass dynamo=True "
                "(the default)")
    if getattr(module, "proj_size", 0):
        _refuse(module, "proj_size", f"with proj_size={module.proj_size}: ONNX's LSTM has no projection "
                "(torch.export.export and AOTInductor take it)")
    if packed:
        _refuse(module, "input", "from a PackedSequence: pass the padded batch and lengths= (ONNX's sequence_lens)")
    if amp is not None:
        _refuse(module, "autocast", f"under autocast ({amp}): export the model in the dtype it should run in")


def _gates(t: torch.Tensor, cell: str, H: int) -> torch.Tensor:
    order = _ONNX_GATES[cell]
    if len(order) == 1:
        return t
    return torch.cat([t[k * H:(k + 1) * H] for k in order], 0)


def onnx_recurrence(cell: str, nonlinearity: str, hidden_size: int, x: torch.Tensor, image, params, states,
                    lengths):
    """One layer, every direction, as one ONNX RNN / LSTM / GRU node.

    x [T, B, I] time-major; image None, [B, V] (static) or [T, B, V] (per step); params: one dict
    per direction (weight_ih, weight_hh, bias_ih, bias_hh, weight_img, as the module holds them);
    states: the initial states, each [D, B, H]; lengths None or int [B].
    -> (y [T, D, B, H], final states, each [D, B, H])."""
    T, B = x.shape[0], x.shape[1]
    D, H = len(params), hidden_size
    if image is not None:
        v = image if image.dim() == 3 else image.unsqueeze(0).expand(T, -1, -1)
        x = torch.cat([x, v], dim=-1)
    w = [p["weight_ih"] if image is None else torch.cat([p["weight_ih"], p["weight_img"]], dim=1) for p in params]
    W = torch.stack([_gates(t, cell, H) for t in w])
    R = torch.stack([_gates(p["weight_hh"], cell, H) for p in params])
    bias = None
    if params[0].get("bias_ih") is not None:
        bias = torch.stack([torch.cat([_gates(p["bias_ih"], cell, H), _gates(p["bias_hh"], cell, H)]) for p in params])
    seq = None if lengths is None else lengths.to(torch.int32)
    attrs = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if cell == "rnn":
        attrs["activations"] = [nonlinearity.capitalize()] * D
    elif cell == "gru":
        attrs["linear_before_reset"] = 1  # PyTorch's GRU: b_hn and W_hn h inside the reset product
    inputs = [x, W, R, bias, seq, states[0]] + ([states[1]] if cell == "lstm" else [])
    n_states = 2 if cell == "lstm" else 1
    outs = torch.onnx.ops.symbolic_multi_out(
        _ONNX_OP[cell], inputs, attrs, dtypes=[x.dtype] * (1 + n_states),
        shapes=[[T, D, B, H]] + [[D, B, H]] * n_states)
    return outs[0], list(outs[1:])


def onnx_layers(module, x, image, states0, lengths):
    """A RecurrentBase module's layers as ONNX nodes (one per layer): x [T, B, I] time-major, image
    None / [B, V] / [T, B, V], states0 a list of [L * D, B, H] -> (output [T, B, D * H], final
    states, each [L * D, B, H])."""
    D = 2 if module.bidirectional else 1
    T, B, H = x.shape[0], x.shape[1], module.hidden_size
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    finals = [[] for _ in states0]
    layer_input = x
    for layer in range(module.num_layers):
        params = [module._params(layer, d) for d in range(D)]
        y, last = onnx_recurrence(module.CELL, nonlinearity, H, layer_input, image, params,
                                  [s[layer * D:(layer + 1) * D] for s in states0], lengths)
        layer_input = y.permute(0, 2, 1, 3).reshape(T, B, D * H)
        for k, s in enumerate(last):
            finals[k].append(s)
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, p=module.dropout, training=True)
    return layer_input, [torch.cat(f) for f in finals]


def onnx_cell(cell_module, x, image, states):
    """A cell (RNNCell, LSTMCell, GRUCell) as a one-step ONNX node: x [B, I], image None / [B, V],
    states [B, H] each -> the new states, each [B, H]."""
    params = [{k: getattr(cell_module, k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_img")}]
    _, last = onnx_recurrence(cell_module.CELL, getattr(cell_module, "nonlinearity", "tanh"), cell_module.hidden_size,
                              x.unsqueeze(0), image, params, [s.unsqueeze(0) for s in states], None)
    return [s[0] for s in last]


def refuse_tracing(module) -> None:
    """torch.jit.trace records aten ops only: the engine's kernels (pybind calls) would leave a graph
    that returns uninitialised memory, so a trace is refused with one clear error. Cheap (one C call):
    every forward asks."""
    if torch._C._get_tracing_state() is not None:
        raise RuntimeError(f"{type(module).__name__} (mmrnn_ext) does not support torch.jit.trace: its kernels are C++ "
                           f"and Triton calls that a trace cannot record; {SHIP_HINT}")


def refuse_torchscript(module):
    """torch.jit.script's hook (__prepare_scriptable__): one clear error naming the supported ways."""
    raise RuntimeError(f"{type(module).__name__} (mmrnn_ext) does not support torch.jit.script: its recurrence is a "
                       f"torch.library custom op that TorchScript cannot compile; {SHIP_HINT}")
