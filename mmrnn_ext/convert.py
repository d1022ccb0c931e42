"""From torch.nn to mmrnn_ext (and back with ``.to_torch()``):

    mmrnn_ext.from_torch(module, image_size=None, image_start=None)   one torch recurrent module or cell
    mmrnn_ext.convert(model) -> (model, report)                        every one inside a model, in place

torch.nn.RNN / LSTM (proj_size too) / GRU / RNNCell / LSTMCell / GRUCell become mmrnn_ext's module of
the same name with the same constructor arguments, device, dtype and training mode, computing the
same function and holding the same Parameter objects where the shapes agree (modules/twin.py). A
model trained on torch.cat([x, image]) is split with image_size: the image columns of the first
layer's weight_ih become weight_img, and ``module(x, image=v)`` computes what torch's module did on
the concatenation.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .modules.twin import ctor_kwargs, image_start_of, param_placement, split_into
from .errors import InputError, InputTypeError

# torch's class -> ours
OURS = {cls.TORCH: cls for cls in (RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell)}
_ACCEPTED = "torch.nn.RNN, LSTM, GRU, RNNCell, LSTMCell or GRUCell"
_RECURRENT_NAMES = {"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"}
_RUN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_RUN_DEVICES = ("cpu", "cuda")


def _torch_class(module) -> type | None:
    """torch's class `module` computes as (its own, or the one a subclass inherits its forward from)."""
    for cls in type(module).__mro__:
        if cls in OURS:
            return cls
    return None


def refusal(module) -> str | None:
    """Why `module` cannot become an mmrnn_ext module computing the same function, or None if it can."""
    if not isinstance(module, nn.Module):
        return f"expected {_ACCEPTED}, got {type(module).__name__} (not an nn.Module)"
    base = _torch_class(module)
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if base is None:
        if type(module).__name__ in _RECURRENT_NAMES and type(module).__module__.startswith("torch."):
            return (f"{name} is not one of torch.nn's float modules ({_ACCEPTED}); convert the float model "
                    "before quantizing it")
        return f"expected {_ACCEPTED}, got {name}"
    if parametrize.is_parametrized(module):
        return (f"{name} has parametrized weights (torch.nn.utils.parametrize: computed on each call, not "
                "Parameters to share); remove the parametrizations first (parametrize.remove_parametrizations)")
    if type(module).forward is not base.forward:
        return (f"{name} overrides forward of torch.nn.{base.__name__}: what it computes is its own; convert "
                f"a plain torch.nn.{base.__name__} holding its parameters if it computes the same")
    hooks = [k for k in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(module, k, None)]
    if hooks:
        return (f"{name} has hooks ({', '.join(h.strip('_') for h in hooks)}; e.g. weight_norm or pruning) that "
                "would not be carried over; remove them first")
    try:
        device, dtype = param_placement(module)
    except InputError as e:
        return str(e).removeprefix("module: ")
    if device.type not in _RUN_DEVICES or dtype not in _RUN_DTYPES:
        return (f"{name} has parameters on {device} in {dtype}; mmrnn_ext runs {', '.join(_RUN_DEVICES)} tensors in "
                + ", ".join(str(d).replace("torch.", "") for d in _RUN_DTYPES))
    return None


def from_torch(module: nn.Module, image_size: int | None = None, *, image_start: int | None = None,
               backend: str = "auto") -> nn.Module:
    """The mmrnn_ext module computing what torch's `module` computes (see the module docstring).

    image_size=V: the V input columns starting at image_start (default: the last V) were the image;
    the result takes input_size - V input columns (the others, in order) and image=[N, V] or per step.
    Raises InputTypeError for a module of another type, InputError for an image_size or image_start
    the module's input cannot hold or parameters on a device or dtype mmrnn_ext does not run."""
    why = refusal(module)
    if why is not None:
        raise (InputTypeError if _torch_class(module) is None else InputError)(f"module: {why}")
    I = module.input_size
    start = 0
    if image_size is not None:
        if not isinstance(image_size, int) or isinstance(image_size, bool) or not 0 < image_size < I:
            raise InputError(f"image_size: expected an int in [1, {I - 1}] (the image columns among the module's "
                             f"input_size = {I}; at least one column must stay the input), got {image_size!r}")
        start = image_start_of(image_start, I, image_size, f"torch.nn.{_torch_class(module).__name__}")
    elif image_start is not None:
        raise InputError(f"image_start: given ({image_start!r}) without image_size; pass image_size too")
    ours_cls = OURS[_torch_class(module)]
    device, dtype = param_placement(module)
    kw = ctor_kwargs(module, lstm=ours_cls.CELL == "lstm")
    kw["input_size"] = I - (image_size or 0)
    ours = ours_cls(**kw, device=device, dtype=dtype, image_size=image_size, backend=backend)
    split_into(ours, module, image_size, start)
    return ours.train(module.training)


@dataclasses.dataclass
class ConversionReport:
    """What mmrnn_ext.convert did: (qualified name, torch's type, ours) for each swapped module and
    (qualified name, type, why) for each recurrent module left as it was. The model itself is named
    "" (convert then returns the new module)."""

    converted: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        def where(name):
            return name or "(the model itself)"

        lines = [f"converted {where(n)}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"not converted {where(n)} ({t}): {why}" for n, t, why in self.skipped]
        return "\n".join(lines) or f"nothing to convert: no {_ACCEPTED} inside the model"


def _looks_recurrent(module) -> bool:
    """A module convert should either swap or report: torch's recurrent classes and their subclasses,
    and torch's quantized / quantizable ones (same names)."""
    return _torch_class(module) is not None or (
        type(module).__name__ in _RECURRENT_NAMES and type(module).__module__.startswith("torch."))


def convert(model: nn.Module, *, backend: str = "auto") -> tuple[nn.Module, ConversionReport]:
    """Swap every torch recurrent module and cell inside `model` (its submodules at any depth,
    Sequential / ModuleList / ModuleDict included) for mmrnn_ext's, in place. Returns (model, report);
    model is the same object unless it is itself a recurrent module. A module used in two places is
    converted once (both places get the same new module). What cannot be converted is left as it was
    and reported (report.skipped) with the reason, and a warning says so, as it does when nothing was
    converted. No image split here: a model's own forward does the concatenation (use from_torch with
    image_size and change that forward)."""
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    done: dict[int, nn.Module] = {}

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if id(module) in done:
            return done[id(module)]
        why = refusal(module)
        if why is not None:
            report.skipped.append((name, f"{type(module).__module__}.{type(module).__qualname__}", why))
            done[id(module)] = None
            return None
        new = done[id(module)] = from_torch(module, backend=backend)
        report.converted.append((name, f"torch.nn.{_torch_class(module).__name__}", f"mmrnn_ext.{type(new).__name__}"))
        return new

    def walk(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if _looks_recurrent(child):
                new = swap(name, child)
                if new is not None:
                    parent._modules[child_name] = new
                continue
            if id(child) in done:  # a shared container: its contents were walked once
                continue
            done[id(child)] = child
            walk(child, name + ".")

    if _looks_recurrent(model):
        new = swap("", model)
        model = model if new is None else new
    else:
        walk(model, "")
    if report.skipped or not report.converted:
        warnings.warn(f"mmrnn_ext.convert: {report}", stacklevel=2)
    return model, report
