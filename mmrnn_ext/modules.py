"""Drop-in replacements for torch.nn.RNN and torch.nn.RNNCell whose every step also sees image features.

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh + W_img v      (v static, or v_t per step)
    h_t = tanh(a_t)    (relu with nonlinearity="relu")

The input projection of all steps is one GEMM per layer and direction; the static image projection
is one [B, H] GEMM per sequence (never repeated over time); the recurrence is the fused op
``mmrnn_ext.ops.rnn_recurrence``.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _backends
from .ops import InputError, _describe, check_lengths, rnn_recurrence
from .reference import NONLINEARITIES


def _check_same(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str, dtype: bool = True) -> None:
    """t must match ref's device and (unless dtype=False: under autocast, which casts) its dtype."""
    if dtype and t.dtype != ref.dtype:
        raise InputError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise InputError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def _time_reverse(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse each row's valid steps in time ([T, B, F]; steps past a row's length stay put).
    The map is its own inverse: applying it to the reversed outputs restores time order."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    lens = lengths.unsqueeze(0)
    idx = torch.where(t < lens, lens - 1 - t, t)
    return x.gather(0, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _autocast_dtype(device: torch.device, param_dtype: torch.dtype):
    """The dtype the recurrence runs in under torch.autocast (as PyTorch's own RNN does), or None.
    float64 models are left alone, as autocast leaves float64 ops alone."""
    if param_dtype != torch.float32 or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _to(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)


def _project(x, image, w_ih, b_ih, b_hh, w_img):
    """The input projection (one GEMM over all steps) and the image term (one GEMM per sequence when
    static). The biases ride with the image term, which the recurrence adds in its elementwise pass
    anyway: a bias in the big input GEMM costs a broadcast copy over all T*B*H outputs (14.5 ms of
    430 at (64, 256, 256, 512, 512) on the 2-core CPU) that this way is a [B, H] add."""
    xp = F.linear(x, w_ih)
    bias = None if b_ih is None else b_ih + b_hh
    if image is not None:
        return xp, F.linear(image, w_img, bias)
    if bias is None:
        return xp, None
    return xp, bias.expand(x.shape[-2], -1)


def _check_image(image, *, image_size, batched, batch, steps, batch_first, module):
    """Validate `image` and return it time-major: [B, V] (static) or [T, B, V] (per step)."""
    if image is None:
        return None
    if image_size is None:
        raise InputError(f"image: this {module} was built without image_size, so it takes no image; "
                         f"got {_describe(image)} (build it with image_size=<feature size>)")
    if not isinstance(image, torch.Tensor):
        raise InputError(f"image: expected a tensor, got {type(image).__name__}")
    if batched:
        static, per_step = (batch, image_size), ((batch, steps, image_size) if batch_first else (steps, batch, image_size))
    else:
        static, per_step = (image_size,), (steps, image_size)
    shape = tuple(image.shape)
    if shape == static:
        return image if batched else image.unsqueeze(0)
    if steps is not None and shape == per_step:
        if not batched:
            return image.unsqueeze(1)
        return image.transpose(0, 1) if batch_first else image
    allowed = f"{static} (static)" + (f" or {per_step} (per step)" if steps is not None else "")
    raise InputError(f"image: expected shape {allowed}, got {shape}")


class RNN(nn.Module):
    """Drop-in for torch.nn.RNN, plus ``image_size`` (features added to every step's pre-activation
    through ``weight_img_l{k}``) and ``backend`` ("auto", "cpp", "triton", "reference").

    forward(input, hx=None, image=None, lengths=None) -> (output, h_n), with nn.RNN's shapes:
    input [L, N, H_in] ([N, L, H_in] with batch_first), [L, H_in] unbatched, or a PackedSequence;
    image [N, V] or per step [L, N, V] ([N, L, V] with batch_first), unbatched [V] or [L, V];
    for a PackedSequence, image rows follow the original batch order, as hx does.
    lengths (optional, padded input only): int [N]; row n uses its first lengths[n] steps, its
    output is zero past them and h_n holds its state at its last valid step. image=None means no
    image term.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 *, image_size=None, backend="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                          f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0):
            raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
        if backend not in ("auto",) + _backends.BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + _backends.BACKEND_NAMES}, got {backend!r}")
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.nonlinearity, self.bias, self.batch_first = nonlinearity, bias, batch_first
        self.dropout, self.bidirectional = float(dropout), bidirectional
        self.proj_size = 0
        self.image_size, self.backend = image_size, backend
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_in = input_size if layer == 0 else hidden_size * num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (hidden_size, layer_in)), ("weight_hh", (hidden_size, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (hidden_size,)), ("bias_hh", (hidden_size,))]
                if image_size is not None:
                    shapes += [("weight_img", (hidden_size, image_size))]
                names = []
                for base, shape in shapes:
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.RNN's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)), in nn.RNN's order."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self):
        return [getattr(self, name) for name in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """No-op, kept for drop-in compatibility: the kernels read each weight where it lives."""

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.image_size is not None:
            s += ", image_size={image_size}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def _layer_params(self, layer: int, direction: int):
        names = self._all_weights[layer * (2 if self.bidirectional else 1) + direction]
        p = {name.split("_l")[0]: getattr(self, name) for name in names}
        return p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"), p.get("weight_img")

    def forward(self, input, hx=None, image=None, lengths=None):
        num_directions = 2 if self.bidirectional else 1
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise InputError("lengths: a PackedSequence carries its own lengths; pass lengths only with padded input")
            x, seq_lengths = pad_packed_sequence(input)  # [T, N, I], original batch order
            batched, batch_first = True, self.batch_first
            lengths = seq_lengths
        else:
            if not isinstance(input, torch.Tensor):
                raise InputError(f"input: expected a tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise InputError(f"input: RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched, batch_first = input.dim() == 3, self.batch_first
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if batch_first else input
        T, B = x.shape[0], x.shape[1]
        if x.shape[-1] != self.input_size:
            raise InputError(f"input: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        amp = _autocast_dtype(x.device, weight.dtype)
        if x.dtype != weight.dtype and not (amp is not None and x.dtype in (torch.float32, amp)):
            raise InputError(f"input: RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        if x.device != weight.device:
            raise InputError(f"input: expected device {weight.device} (the device of the parameters), got {x.device}")

        expected_hx = (self.num_layers * num_directions, B, self.hidden_size)
        if hx is None:
            h0_all = x.new_zeros(expected_hx)
        else:
            if not isinstance(hx, torch.Tensor):
                raise InputError(f"hx: expected a tensor, got {type(hx).__name__}")
            if batched and hx.dim() != 3:
                raise InputError(f"hx: For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            if not batched and hx.dim() != 2:
                raise InputError(f"hx: For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
            h0_all = hx if batched else hx.unsqueeze(1)
            if tuple(h0_all.shape) != expected_hx:
                want = expected_hx if batched else (expected_hx[0], expected_hx[2])
                raise InputError(f"hx: Expected hidden size {want}, got {list(hx.shape)}")
            _check_same("hx", h0_all, x, "input", dtype=amp is None)

        img = _check_image(image, image_size=self.image_size, batched=batched, batch=B, steps=T,
                           batch_first=batch_first, module="RNN")
        if img is not None:
            _check_same("image", img, x, "input", dtype=amp is None)
        if lengths is not None and not packed:
            if not batched:
                raise InputError("lengths: only batched input takes lengths; an unbatched sequence uses all its steps")
            if not isinstance(lengths, torch.Tensor):
                lengths = torch.as_tensor(lengths)
        compiling = torch.compiler.is_compiling()
        if lengths is not None:
            # the op checks too, but the input GEMM below runs first (values: eagerly only, since
            # reading them is a host sync that would break a compiled graph)
            check_lengths(lengths, B, T, check_values=not compiling)
            lengths = lengths.to(device=x.device, dtype=torch.int64).contiguous()
        if not compiling:
            _backends.select(self.backend, x.device, amp or x.dtype)  # an unavailable backend fails before any GEMM

        layer_input = x
        h_n = []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(num_directions):
                w_ih, w_hh, b_ih, b_hh, w_img = self._layer_params(layer, direction)
                xp, img_term = _project(layer_input, img, w_ih, b_ih, b_hh, w_img)
                xp, img_term, w_hh = _to(xp, amp), _to(img_term, amp), _to(w_hh, amp)
                if direction == 1:
                    xp = _time_reverse(xp, lengths)
                    if img_term is not None and img_term.dim() == 3:
                        img_term = _time_reverse(img_term, lengths)
                out, h_last = rnn_recurrence(xp, w_hh, _to(h0_all[layer * num_directions + direction], amp), img_term,
                                             lengths, self.nonlinearity, self.backend)
                outs.append(_time_reverse(out, lengths) if direction == 1 else out)
                h_n.append(h_last)
            layer_input = outs[0] if num_directions == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = layer_input
        h_n = torch.stack(h_n) if h_n else h0_all

        if packed:
            sorted_lengths = seq_lengths if input.sorted_indices is None else seq_lengths[input.sorted_indices.cpu()]
            out_sorted = output if input.sorted_indices is None else output.index_select(1, input.sorted_indices.to(output.device))
            data = pack_padded_sequence(out_sorted, sorted_lengths, enforce_sorted=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), h_n
        if not batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if batch_first else output), h_n


class RNNCell(nn.Module):
    """Drop-in for torch.nn.RNNCell, plus ``image_size`` (parameter ``weight_img``) and ``backend``.

    forward(input, hx=None, image=None) -> h'; input [N, H_in] or [H_in], hx [N, H] or [H],
    image [N, V] or [V]."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None,
                 *, image_size=None, backend="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0):
            raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
        if backend not in ("auto",) + _backends.BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {('auto',) + _backends.BACKEND_NAMES}, got {backend!r}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.nonlinearity, self.image_size, self.backend = nonlinearity, image_size, backend
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if image_size is not None:
            self.weight_img = nn.Parameter(torch.empty(hidden_size, image_size, **factory))
        else:
            self.register_parameter("weight_img", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        if self.image_size is not None:
            s += ", image_size={image_size}"
        if self.backend != "auto":
            s += ", backend={backend!r}"
        return s.format(**self.__dict__)

    def forward(self, input, hx=None, image=None):
        if not isinstance(input, torch.Tensor):
            raise InputError(f"input: expected a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise InputError(f"input: RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if x.shape[1] != self.input_size:
            raise InputError(f"input: has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        amp = _autocast_dtype(x.device, self.weight_ih.dtype)
        _check_same("input", x, self.weight_ih, "the parameters", dtype=amp is None)
        if hx is None:
            h0 = x.new_zeros(B, self.hidden_size)
        else:
            if not isinstance(hx, torch.Tensor):
                raise InputError(f"hx: expected a tensor, got {type(hx).__name__}")
            if hx.dim() != input.dim():
                raise InputError(f"hx: expected a {input.dim()}-D tensor like input, got {hx.dim()}-D")
            h0 = hx if batched else hx.unsqueeze(0)
            if tuple(h0.shape) != (B, self.hidden_size):
                raise InputError(f"hx: expected shape {(B, self.hidden_size) if batched else (self.hidden_size,)}, got {tuple(hx.shape)}")
            _check_same("hx", h0, x, "input", dtype=amp is None)
        img = _check_image(image, image_size=self.image_size, batched=batched, batch=B, steps=None,
                           batch_first=False, module="RNNCell")
        if img is not None:
            _check_same("image", img, x, "input", dtype=amp is None)
        if not torch.compiler.is_compiling():
            _backends.select(self.backend, x.device, amp or x.dtype)
        xp, img_term = _project(x, img, self.weight_ih, self.bias_ih, self.bias_hh, self.weight_img)
        _, h = rnn_recurrence(_to(xp, amp).unsqueeze(0), _to(self.weight_hh, amp), _to(h0, amp), _to(img_term, amp),
                              None, self.nonlinearity, self.backend)
        return h if batched else h.squeeze(0)
