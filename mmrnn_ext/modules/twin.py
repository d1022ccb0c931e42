"""A module's torch twin: the constructor arguments and parameters mmrnn_ext's modules share with
torch.nn's, and where a concatenated image's columns sit in torch's first-layer weight_ih. Both
directions of mmrnn_ext.from_torch / .to_torch() map parameters here; nothing else is involved.

    torch:      W_ih' [x_t, v] = W_ih' [:, :s] x_t[:s] + W_ih' [:, s:s+V] v + W_ih' [:, s+V:] x_t[s:]
    mmrnn_ext:  W_ih x_t + W_img v        with W_ih = W_ih' minus the image columns, W_img = those columns

Only the first layer of a torch stack sees the input (and so the image); the layers above it see the
layer below. Parameters whose shapes agree are shared (the same nn.Parameter objects, so an optimizer
built on one module keeps training the other); the split or joined first-layer weights are new
Parameters with the same values and requires_grad.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

# the parameters both sides name alike, per layer and direction (weight_img is ours only)
SHARED = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def is_cell(module: nn.Module) -> bool:
    return not hasattr(module, "num_layers")


def suffixes(module: nn.Module) -> list[tuple[int, str]]:
    """(layer, parameter-name suffix) of every layer and direction: [(0, "")] for a cell."""
    if is_cell(module):
        return [(0, "")]
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [(layer, f"_l{layer}{d}") for layer in range(module.num_layers) for d in directions]


def ctor_kwargs(module: nn.Module, lstm: bool) -> dict:
    """The constructor arguments torch's module and ours share, read from either (same attribute names)."""
    names = ("input_size", "hidden_size", "bias") if is_cell(module) else \
        ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    kw = {name: getattr(module, name) for name in names}
    if hasattr(module, "nonlinearity"):
        kw["nonlinearity"] = module.nonlinearity
    if lstm and not is_cell(module):
        kw["proj_size"] = module.proj_size
    return kw


def param_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The one device and dtype every parameter of `module` has (an InputError when they differ)."""
    params = list(module.parameters())
    places = {(p.device, p.dtype) for p in params}
    if len(places) != 1:
        found = ", ".join(sorted(f"{d} {t}".replace("torch.", "") for d, t in places))
        raise InputError(f"module: expected every parameter on one device and dtype, got {found}")
    return places.pop()


def image_start_of(image_start, width: int, image_size: int, what: str) -> int:
    """The first image column in a concatenated input of `width` columns (default: the last columns)."""
    if image_start is None:
        return width - image_size
    if not isinstance(image_start, int) or isinstance(image_start, bool) or not 0 <= image_start <= width - image_size:
        raise InputError(f"image_start: expected an int in [0, {width - image_size}] (where the {image_size} image "
                         f"columns start among the {width} input columns of {what}), got {image_start!r}")
    return image_start


def _new_param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _shared_params(module: nn.Module):
    """(layer, suffix, base name, Parameter) of every parameter torch's module and ours both name."""
    for layer, suffix in suffixes(module):
        for base in SHARED:
            p = getattr(module, base + suffix, None)
            if p is not None:
                yield layer, suffix, base, p


def split_into(ours: nn.Module, stock: nn.Module, image_size, image_start: int) -> None:
    """Give `ours` the parameters of torch's `stock`: shared objects, the first layer's weight_ih split
    into weight_ih and weight_img at image_start when image_size is set (the layers above start with
    a zero weight_img)."""
    V, s = image_size, image_start
    for layer, suffix, base, p in _shared_params(stock):
        if base == "weight_ih" and V and layer == 0:
            setattr(ours, base + suffix, _new_param(torch.cat([p[:, :s], p[:, s + V:]], 1), p))
            setattr(ours, "weight_img" + suffix, _new_param(p[:, s:s + V], p))
        elif base == "weight_ih" and V:
            with torch.no_grad():
                getattr(ours, "weight_img" + suffix).zero_()
            getattr(ours, "weight_img" + suffix).requires_grad_(p.requires_grad)
        if not (base == "weight_ih" and V and layer == 0):
            setattr(ours, base + suffix, p)


def check_joinable(ours: nn.Module) -> None:
    """A torch stack sees the image in its first layer only: refuse a stack whose layers above the
    first have a nonzero weight_img (torch has no module that computes it)."""
    if not ours.image_size:
        return
    for layer, suffix in suffixes(ours):
        w = getattr(ours, "weight_img" + suffix)
        if layer > 0 and bool(w.detach().ne(0).any()):
            name = type(ours).__name__
            raise InputError(f"to_torch: this {name}'s layer {layer} sees the image (weight_img{suffix} is nonzero), "
                             f"but a torch.nn.{name} on torch.cat([input, image]) shows the image to its first layer "
                             "only: no torch module computes this one")


def join_into(stock: nn.Module, ours: nn.Module, image_start: int) -> None:
    """Give torch's `stock` the parameters of `ours`: shared objects, the first layer's weight_ih
    joined with weight_img at image_start when ours has an image (see check_joinable first)."""
    V, s = ours.image_size, image_start
    for layer, suffix, base, p in _shared_params(ours):
        if base == "weight_ih" and V and layer == 0:
            p = _new_param(torch.cat([p[:, :s], getattr(ours, "weight_img" + suffix), p[:, s:]], 1), p)
        setattr(stock, base + suffix, p)


class TorchTwin:
    """``.to_torch()`` for mmrnn_ext's modules and cells (a class sets TORCH, torch's class)."""

    TORCH: type = nn.Module

    def to_torch(self, image_start: int | None = None) -> nn.Module:
        """The torch.nn module (torch.nn.RNN / LSTM / GRU or cell) that computes what this one does,
        on the same device, dtype and training mode, sharing the parameters whose shapes agree.

        With image_size V, torch's module takes the image as V more input columns at image_start
        (default: last): ``twin(torch.cat([x, image], -1))`` equals ``self(x, image=image)``, a static
        image expanded over the steps. Raises InputError for a stack whose layers above the first see
        the image (nonzero weight_img_l1...): torch's module shows the image to its first layer only."""
        V = self.image_size or 0
        start = image_start_of(image_start, self.input_size + V, V, f"torch.nn.{type(self).__name__}") if V else 0
        check_joinable(self)
        device, dtype = param_placement(self)
        kw = ctor_kwargs(self, lstm=self.CELL == "lstm")
        kw["input_size"] = self.input_size + V
        stock = self.TORCH(**kw, device=device, dtype=dtype)
        join_into(stock, self, start)
        return stock.train(self.training)
