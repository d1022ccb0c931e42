"""What mmrnn_ext.RNN, LSTM and GRU (and their cells) share, written once: the constructor's checks
and parameters, the layer x direction loop (unbatched / batch_first / PackedSequence / lengths, hx
checks, input and image projections, time reversal, dropout between layers, final states), as
torch's own nn.RNNBase does for its three cells. A cell contributes its gate count, its state
layout and one recurrence call (``_recurrence``).

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh + W_img v      (v static, or v_t per step; every gate)

The input projection of all steps is one GEMM per layer and direction; the static image projection
is one [B, G*H] GEMM per sequence (never repeated over time).
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _backends
from ..ops import InputError, _describe, check_lengths
from ..ops.common import input_weight_grad, no_gradient_possible, outer_term, shape_is, summed_bias
from .. import export as _export
from .twin import TorchTwin


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


# The parameters a cell's _recurrence reads (the input-side ones went into the projections): under
# autocast only these are cast, once per layer and direction.
_RECURRENT_PARAMS = ("weight_hh", "weight_hr", "bias_hh")


def _to(t, dtype):
    return t if t is None or dtype is None else t.to(dtype)


def _contiguous(t):
    return None if t is None else t.contiguous()


class _EngineProduct(torch.autograd.Function):
    """x [..., K] @ w_ih [N, K]^T on the engine's kernels with its gradients: dX = dA @ W_ih and
    dW_ih = dA^T X (a reduction over all T*B rows) on the engine too. On the 2-core AMD
    EPYC (Zen 4, AVX-512) the engine ran the grid's input products 20-38% and dA @ W_ih 10-22% faster
    than torch's (MKL) GEMMs (bench/NOTES.md, "Training on AVX-512"). A double backward
    (create_graph) runs both gradients as torch ops, so they have a history."""

    @staticmethod
    def forward(x, w_ih, engine):
        return engine.linear(x, w_ih.contiguous())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_ih, engine = inputs
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.engine = engine
        ctx.save_for_backward(x if need_w else None, w_ih if need_x else None)

    @staticmethod
    def backward(ctx, grad):
        x, w_ih = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = dw = None
        if need_x:
            dx = grad.matmul(w_ih) if torch.is_grad_enabled() else ctx.engine.linear(grad, w_ih.contiguous(), False)
        if need_w:
            dw = input_weight_grad(grad, x, None if torch.is_grad_enabled() else ctx.engine)
        return dx, dw, None


def _input_product(x, w_ih, engine):
    """x @ w_ih^T over all steps. engine (a backend's Engine, or None): on its kernels (the cpp
    backend's, float32 CPU, see RecurrentBase.forward), differentiable where a gradient may be asked
    for; torch's F.linear otherwise. The engine runs these tall products faster than MKL's sgemm on
    both CPUs measured: 150-190 against 95-132 GF/s on a Zen 1 EPYC, 20-38% on a Zen 4 EPYC
    (bench/NOTES.md)."""
    if engine is None:
        return F.linear(x, w_ih)
    if no_gradient_possible((x, w_ih)):
        return engine.linear(x, w_ih.contiguous())
    return _EngineProduct.apply(x, w_ih, engine)


def _project(x, image, w_ih, bias, w_img, engine=None):
    """The input projection (one GEMM over all steps) and the image term with the outer biases
    (ops.common.outer_term)."""
    return _input_product(x, w_ih, engine), outer_term(image, w_img, bias, x.shape[-2])


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
    if shape_is(image, static):
        return image if batched else image.unsqueeze(0)
    if steps is not None and shape_is(image, per_step):
        if not batched:
            return image.unsqueeze(1)
        return image.transpose(0, 1) if batch_first else image
    allowed = f"{static} (static)" + (f" or {per_step} (per step)" if steps is not None else "")
    raise InputError(f"image: expected shape {allowed}, got {shape}")


# The cell kinds of the decoding step (csrc/cell_step.cpp).
_STEP_KIND = {"tanh": 0, "relu": 1, "lstm": 2, "gru": 3}
_STEP_DTYPES = (torch.float32, torch.float64)


def _decode_possible(x, backend):
    """The engine whose step kernels a CPU call on x can take, or None: a plain float32/float64 CPU
    tensor, a backend setting whose engine is built (_backends.step_engine), nothing that could
    want a gradient or a traced graph (grad mode off — else the caller checks requires_grad —, no
    autocast, forward AD, torch.func transform or compile). Cheap: this runs before every decoding step."""
    if not (type(x) is torch.Tensor and x.is_cpu and x.dtype in _STEP_DTYPES
            and not torch.is_autocast_enabled("cpu") and torch.autograd.forward_ad._current_level < 0
            and not torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None):
        return None
    return _backends.step_engine(backend)


def _check_common_ctor(hidden_size, image_size, backend):
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0):
        raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
    if backend not in ("auto",) + _backends.BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {('auto',) + _backends.BACKEND_NAMES}, got {backend!r}")


class _Shared:
    """What RecurrentBase and CellBase (and so every module and cell) share beyond the parameters."""

    def _step_kind(self):
        """The decoding step's cell kind (cell_step.cpp: 0 RNN tanh, 1 RNN relu, 2 LSTM, 3 GRU), or
        None where a one-step call takes the sequence path (LSTM with proj_size)."""
        return _STEP_KIND[self.CELL] if self.CELL != "rnn" else _STEP_KIND[self.nonlinearity]

    def _hx_tensors(self, hx):
        """hx as a tuple of STATES tensors (checked for type only; the LSTM's take a pair)."""
        if isinstance(hx, torch.Tensor):
            return (hx,)
        lstm = "LSTMCell" if isinstance(self, CellBase) else "LSTM"
        raise InputError(f"hx: expected a tensor, got {type(hx).__name__}"
                         + (f" (only {lstm} takes a tuple (h_0, c_0))" if isinstance(hx, (tuple, list)) else ""))

    def _fast_states(self, hx):
        """A given hx as (h, c) for a fast step ((hx, None) with one state), or None where its form
        is not one (the checked path then says what is wrong)."""
        if self.STATES == 1:
            return hx, None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            return None
        return tuple(hx)

    # Which of the tensors forward returns, in order (a module: output, h_n[, c_n]; a cell: h[, c]),
    # torch's own class returns in the parameters' dtype, not the autocast dtype, under CPU autocast
    # (measured on torch 2.13: nn.GRU computes per step in bf16 but returns float32, GRUCell and
    # LSTMCell return float32, nn.LSTM with proj_size keeps c_n in float32). Each cell says; None:
    # every one in the autocast dtype. Under CUDA autocast every output stays in the autocast dtype
    # (not checked against torch on a GPU).
    AUTOCAST_FULL = None

    def _autocast_full(self) -> tuple:
        returned = self.STATES + (0 if isinstance(self, CellBase) else 1)
        return self.AUTOCAST_FULL or (False,) * returned

    REPR_CELL = ()  # a cell's own constructor arguments as (name, default), shown where they differ

    def _repr_items(self):
        """The (name, default) pairs extra_repr names where the value differs, in torch's order."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """torch's extra_repr (the arguments that differ from their defaults, in torch's order), then
        image_size and backend."""
        parts = [f"{self.input_size}, {self.hidden_size}"]
        for name, default in (*self._repr_items(), ("image_size", None), ("backend", "auto")):
            value = getattr(self, name)
            if (value is not default) if isinstance(default, bool) or default is None else value != default:
                parts.append(f"{name}={value!r}" if name == "backend" else f"{name}={value}")
        return ", ".join(parts)


class RecurrentBase(TorchTwin, _Shared, nn.Module):
    """The shared multi-layer module. Subclasses set

        CELL     "rnn", "lstm" or "gru" (the backend table's key)
        GATES    1, 4 or 3 (the rows of W_ih / W_hh / W_img are GATES * hidden_size)
        STATES   1 (h) or 2 (h, c)

    and implement ``_recurrence(params, xp, image_term, states, lengths) -> (out, final_states)``
    on time-major tensors (see mmrnn_ext.ops); params holds weight_hh, weight_hr and bias_hh (where
    the layer has them), in the dtype the recurrence runs in."""

    CELL, GATES, STATES = "rnn", 1, 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, image_size=None, backend="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                          f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        _check_common_ctor(hidden_size, image_size, backend)
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first = bias, batch_first
        self.dropout, self.bidirectional, self.proj_size = float(dropout), bidirectional, proj_size
        self.image_size, self.backend = image_size, backend
        num_directions = 2 if bidirectional else 1
        G, out_size = self.GATES * hidden_size, proj_size or hidden_size
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_in = input_size if layer == 0 else out_size * num_directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (G, layer_in)), ("weight_hh", (G, out_size))]
                if bias:
                    shapes += [("bias_ih", (G,)), ("bias_hh", (G,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                if image_size is not None:
                    shapes += [("weight_img", (G, image_size))]
                names = []
                for base, shape in shapes:
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        _export.refuse_torchscript(self)

    def reset_parameters(self) -> None:
        """torch's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)), in torch's order."""
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

    def _repr_items(self):
        return (("proj_size", 0), ("num_layers", 1), *self.REPR_CELL, ("bias", True), ("batch_first", False),
                ("dropout", 0), ("bidirectional", False))

    def _params(self, layer: int, direction: int) -> dict:
        names = self._all_weights[layer * (2 if self.bidirectional else 1) + direction]
        return {name.split("_l")[0]: getattr(self, name) for name in names}

    def _layer_params(self, layer: int, direction: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_img) of one layer and direction (None where absent)."""
        p = self._params(layer, direction)
        return p["weight_ih"], p["weight_hh"], p.get("bias_ih"), p.get("bias_hh"), p.get("weight_img")

    # --- what a cell provides ---------------------------------------------------------------------

    def _state_sizes(self):
        """The width of each state in hx: (h,) or (h, c)."""
        return (self.proj_size or self.hidden_size,) * self.STATES

    def _outer_bias(self, p):
        """The biases added outside the recurrent product, summed ([G*H]; None without bias)."""
        return summed_bias(p.get("bias_ih"), p.get("bias_hh"))

    def _recurrence(self, p, xp, image_term, states, lengths):
        raise NotImplementedError

    def _autocast_outputs(self, amp, full_dtype, output, states):
        """The outputs in the dtypes torch's module returns under the same autocast: computed as
        fast as the precision policy allows (in `amp`), then cast where torch's are full precision."""
        full = self._autocast_full()
        output = output.to(full_dtype if full[0] else amp)
        return output, [s.to(full_dtype if f else amp) for s, f in zip(states, full[1:])]

    def _fused_inference(self, engine, p):
        """A callable (x, image_term, states, lengths) -> (out, final states) running this layer and
        direction's inference with the input product fused into the recurrence (engine.infer, the
        backend's), or None where the cell has none. p holds weight_ih, weight_hh and bias_hh (where the
        layer has biases), in the dtype it runs in."""
        return None

    def _fused_training(self, engine, p):
        """A callable (x, image, states, lengths) -> (out, final states) running this layer and
        direction's float32 training forward with the input product fused into the recurrence and
        the outer term (image GEMM and biases) inside the op (the engine's train_forward;
        differentiable, see ops.common.FusedInputOp), or None where the cell has none. p holds the
        layer and direction's parameters (weight_img None where a per-step image went into weight_ih)."""
        return None

    def _step_names(self):
        """Per layer and direction, the names of (weight_ih, weight_hh, bias_ih, bias_hh, weight_img)
        (None where absent): fixed by the constructor, so worked out once (the decoding step reads
        the parameters through them from self._parameters, so a replaced parameter is seen)."""
        names = self.__dict__.get("_step_names_cache")
        if names is None:
            keys = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_img")
            names = []
            for layer_names in self._all_weights:
                by_key = {name.split("_l")[0]: name for name in layer_names}
                names.append(tuple(by_key.get(k) for k in keys))
            self.__dict__["_step_names_cache"] = names = tuple(names)
        return names

    def _fast(self, input, hx, image):
        """One step (T = 1, no lengths) with a carried state and no gradient possible, straight to
        the decoding kernel (csrc/cell_step.cpp) per layer and direction, as the cells' _fast does:
        the conditions of _decode_possible, float32/float64 CPU, the weights read where they are.
        The kernel checks the shapes and dtypes of what it is given (hx's leading size here);
        None where it refuses one, or the call is another case: forward's checked path then gives
        the error, or runs the call."""
        kind = self._step_kind()
        if kind is None or type(input) is not torch.Tensor:
            return None
        dim, batch_first = input.dim(), self.batch_first
        if dim == 3:
            if input.shape[1 if batch_first else 0] != 1:
                return None
            x = input[:, 0] if batch_first else input[0]
        elif dim == 2 and input.shape[0] == 1:
            x = input  # unbatched: one step of [I] is a batch of one
        else:
            return None
        engine = _decode_possible(input, self.backend)
        if engine is None or _export._dynamo_exporter_flag():
            return None
        P = self._parameters
        if torch.is_grad_enabled() and (input.requires_grad or any(p.requires_grad for p in P.values())):
            return None
        D = 2 if self.bidirectional else 1
        LD, B, H = self.num_layers * D, x.shape[0], self.hidden_size
        if hx is None:
            h0 = c0 = x.new_zeros(LD, B, H)
        else:
            pair = self._fast_states(hx)
            if pair is None:
                return None
            h0, c0 = pair
            for s in (h0, c0)[:self.STATES]:
                if not isinstance(s, torch.Tensor) or s.shape != ((LD, B, H) if dim == 3 else (LD, H)):
                    return None
            if dim == 2:
                h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
        v = None
        if image is not None:
            if self.image_size is None or not isinstance(image, torch.Tensor):
                return None
            if image.dim() == dim - 1:  # static
                v = image if dim == 3 else image.unsqueeze(0)
            elif image.dim() == dim and image.shape[1 if batch_first and dim == 3 else 0] == 1:  # per step, T = 1
                v = image[:, 0] if batch_first and dim == 3 else image[0] if dim == 3 else image
            else:
                return None
        lstm = self.STATES == 2
        layer_input, hs, cs = x, [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(D):
                idx = layer * D + direction
                w_ih, w_hh, b_ih, b_hh, w_img = (None if n is None else P[n] for n in self._step_names()[idx])
                try:
                    h, c = engine.cell_step(kind, layer_input, h0[idx], c0[idx] if lstm else None, v, w_ih, w_hh,
                                            w_img if v is not None else None, b_ih, b_hh)
                except (RuntimeError, TypeError):  # a refused argument: the checked path says what is wrong
                    return None
                outs.append(h)
                hs.append(h)
                if lstm:
                    cs.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        finals = [torch.stack(hs, 0)] + ([torch.stack(cs, 0)] if lstm else [])
        if dim == 2:
            return layer_input, self._final_states(finals, False)
        return layer_input.unsqueeze(1 if batch_first else 0), self._final_states(finals, True)

    # --- hx ----------------------------------------------------------------------------------------

    def _initial_states(self, hx, x, batched, B, amp):
        D = 2 if self.bidirectional else 1
        sizes = self._state_sizes()
        names = ("h_0", "c_0") if self.STATES == 2 else ("hx",)
        if hx is None:
            return [x.new_zeros(self.num_layers * D, B, s) for s in sizes]
        states = []
        for k, (t, size) in enumerate(zip(self._hx_tensors(hx), sizes)):
            where = "hx" if self.STATES == 1 else f"hx[{k}] ({names[k]})"
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{where}: expected a tensor, got {type(t).__name__}")
            if batched and t.dim() != 3:
                raise InputError(f"{where}: For batched 3-D input, hx should also be 3-D but got {t.dim()}-D tensor")
            if not batched and t.dim() != 2:
                raise InputError(f"{where}: For unbatched 2-D input, hx should also be 2-D but got {t.dim()}-D tensor")
            s = t if batched else t.unsqueeze(1)
            expected = (self.num_layers * D, B, size)
            if tuple(s.shape) != expected:
                want = expected if batched else (expected[0], expected[2])
                hidden = "hidden size" if self.STATES == 1 else f"hidden[{k}] size"
                raise InputError(f"{where}: Expected {hidden} {want}, got {list(t.shape)}")
            _check_same(where, s, x, "input", dtype=amp is None)
            states.append(s)
        return states

    def _final_states(self, states, batched):
        states = [s if batched else s.squeeze(1) for s in states]
        return states[0] if self.STATES == 1 else tuple(states)

    # --- forward -----------------------------------------------------------------------------------

    # A per-step image [T, B, V] is more input columns: W_ih x_t + W_img v_t = [W_ih | W_img] [x_t, v_t].
    # Folded into the input product (one GEMM over K = I + V, or the fused inference kernel's own
    # input product) instead of a [T, B, G*H] image term written and read back by the recurrence
    # (measured in bench/NOTES.md, "Per-step images"). False: the image-term form (for comparison).
    FOLD_STEP_IMAGE = True

    # With gradients (float32 CPU), the RNN's and LSTM's input product inside the recurrence's
    # tiles (K = I + H per step) instead of a separate product whose [T, B, G*H] result the
    # recurrence reads back, from batch 2 up: a training step 3-11% faster at B >= 8, equal or
    # better at B = 2-4, but 2-12% slower at B = 1, where a step is bound by reading the weights and
    # the fused one reads W_ih every step too (bench/NOTES.md, "The input product inside the
    # training forward"). Float32 inference takes the same rule (fused inference at B = 1 was 5-31%
    # slower, both cells; bfloat16 inference keeps its fused kernel: mixed there). False: the
    # separate product in training (for comparison).
    FUSE_TRAINING_PRODUCT = True

    def _direction(self, p, x, img, states, lengths, amp, product, fuse, reverse):
        """One layer and direction over the whole sequence x [T, B, K] -> (out [T, B, H] in time
        order, final states): the backend's fused inference where it offers one (fuse, an Engine),
        or with gradients its fused training forward (on `product`, an Engine, when given: the RNN
        and LSTM), else the input projection (on `product` when given) then the cell's recurrence.
        reverse: the backward direction (each row's valid steps reversed in, its outputs back)."""
        def flip(t):
            return _time_reverse(t, lengths) if reverse and t is not None and t.dim() == 3 else t

        # float32 at batch 1: the separate product (a step there is bound by reading the weights,
        # and a fused step reads W_ih every step too; see FUSE_TRAINING_PRODUCT)
        separate = product is not None and x.shape[1] == 1
        fused = None
        if fuse is not None and not separate:
            fused = self._fused_inference(fuse, {k: _to(p[k], amp) for k in ("weight_ih", "weight_hh", "bias_hh")
                                                 if p.get(k) is not None})
        elif fuse is None and product is not None and self.FUSE_TRAINING_PRODUCT and not separate:
            fused = self._fused_training(product, p)
        if fused is not None and fuse is None:
            # training: the input product inside every step's tile, the image term and biases inside
            # the op (float32: no autocast)
            out, last = fused(flip(x).contiguous(), flip(img), states, lengths)
        elif fused is not None:
            # the input product inside every step's tile (inference under autocast in its dtype:
            # bf16 operands, float32 accumulation and state)
            x_in = flip(x)
            img_term = _to(outer_term(img, p.get("weight_img"), self._outer_bias(p), x_in.shape[-2]), amp)
            out, last = fused(_to(x_in, amp).contiguous(), flip(img_term), [_to(s, amp) for s in states], lengths)
        else:
            xp, img_term = _project(x, img, p["weight_ih"], self._outer_bias(p), p.get("weight_img"), product)
            recurrent = {k: _to(v, amp) for k, v in p.items() if k in _RECURRENT_PARAMS}
            out, last = self._recurrence(recurrent, flip(_to(xp, amp)), flip(_to(img_term, amp)),
                                         [_to(s, amp) for s in states], lengths)
        return flip(out), last

    def _run_layers(self, x, img, states0, lengths, amp, fuse, product):
        """The layer x direction loop on time-major x [T, B, I] -> (output [T, B, D * H], final
        states, each [L * D, B, H]). fuse / product: see forward."""
        num_directions = 2 if self.bidirectional else 1
        layer_input = x
        finals = [[] for _ in range(self.STATES)]
        fold = self.FOLD_STEP_IMAGE and img is not None and img.dim() == 3
        for layer in range(self.num_layers):
            outs = []
            # the layer's input with the per-step image as more columns (both directions read it)
            joint = torch.cat([layer_input, _to(img, layer_input.dtype)], dim=-1) if fold else None
            for direction in range(num_directions):
                p = self._params(layer, direction)
                idx = layer * num_directions + direction
                if fold:
                    p = dict(p, weight_ih=torch.cat([p["weight_ih"], p["weight_img"]], dim=1), weight_img=None)
                states = [s[idx] for s in states0]
                out, last = self._direction(p, joint if fold else layer_input, None if fold else img, states,
                                            lengths, amp, product, fuse, reverse=direction == 1)
                outs.append(out)
                for k, s in enumerate(last):
                    finals[k].append(s)
            layer_input = outs[0] if num_directions == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        return layer_input, [torch.stack(f) for f in finals]

    def forward(self, input, hx=None, image=None, lengths=None):
        if lengths is None:
            out = self._fast(input, hx, image)  # one decoding step
            if out is not None:
                return out
        name = type(self).__name__
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        exporting_onnx = _export.onnx_exporting()
        if exporting_onnx:
            _export.check_onnx_exportable(self, packed=packed, amp=_autocast_dtype(weight.device, weight.dtype))
        else:
            _export.refuse_tracing(self)
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
                raise InputError(f"input: {name}: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched, batch_first = input.dim() == 3, self.batch_first
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if batch_first else input
        T, B = x.shape[0], x.shape[1]
        if x.shape[-1] != self.input_size:
            raise InputError(f"input: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}")
        if T == 0:
            raise InputError(f"input: expected a sequence of at least one step, got length 0 (torch.nn.{name} "
                             "raises for length 0 too; a row may still have length 0 through `lengths`)")
        amp = _autocast_dtype(x.device, weight.dtype)
        if x.dtype != weight.dtype and not (amp is not None and x.dtype in (torch.float32, amp)):
            if not x.is_floating_point():  # a model cannot take an integer dtype: only the input can change
                raise InputError(f"input: {name} expects a floating-point input of the parameters' dtype "
                                 f"({weight.dtype}), got {x.dtype}; convert it: input.to({weight.dtype}) (token ids "
                                 "go through an nn.Embedding first)")
            raise InputError(f"input: {name} input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
                             f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})")
        if x.device != weight.device:
            raise InputError(f"input: expected device {weight.device} (the device of the parameters), got {x.device}")
        states0 = self._initial_states(hx, x, batched, B, amp)

        img = _check_image(image, image_size=self.image_size, batched=batched, batch=B, steps=T,
                           batch_first=batch_first, module=name)
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
        fuse = product = None
        if not compiling:
            # an unavailable backend fails before any GEMM
            chosen = _backends.select(self.backend, x.device, amp or x.dtype, self.CELL)
            if chosen.engine is not None and no_gradient_possible(itertools.chain((x,), self.parameters())):
                # product: float32 inference's input product on the backend's engine; fuse: its input
                # product inside the recurrence, float32 or bfloat16 (autocast)
                product = chosen.engine if x.dtype == torch.float32 and amp is None else None
                fuse = chosen.engine if (amp or x.dtype) in (torch.float32, torch.bfloat16) else None
            elif (chosen.engine is not None and x.dtype == torch.float32 and amp is None
                    and torch.autograd.forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active()):
                # product: with gradients, the input products on the engine too (float32; not under
                # forward AD or a torch.func transform, which need torch's differentiable ops)
                product = chosen.engine

        if exporting_onnx:
            output, states = _export.onnx_layers(self, x, img, states0, lengths)
        else:
            output, states = self._run_layers(x, img, states0, lengths, amp, fuse, product)
        if amp is not None and x.device.type == "cpu":
            output, states = self._autocast_outputs(amp, weight.dtype, output, states)

        if packed:
            sorted_lengths = seq_lengths if input.sorted_indices is None else seq_lengths[input.sorted_indices.cpu()]
            out_sorted = output if input.sorted_indices is None else output.index_select(1, input.sorted_indices.to(output.device))
            data = pack_padded_sequence(out_sorted, sorted_lengths, enforce_sorted=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), \
                self._final_states(states, True)
        if not batched:
            return output.squeeze(1), self._final_states(states, False)
        return (output.transpose(0, 1) if batch_first else output), self._final_states(states, True)


class CellBase(TorchTwin, _Shared, nn.Module):
    """The shared single-step module (RNNCell, LSTMCell, GRUCell): parameters weight_ih, weight_hh,
    bias_ih, bias_hh as torch's plus weight_img, and the checks of input, hx and image. A cell sets
    CELL, GATES, STATES and implements ``_step(xp [1, B, G*H], image_term, states) -> states'``."""

    CELL, GATES, STATES = "rnn", 1, 1

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *, image_size=None, backend="auto"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        _check_common_ctor(hidden_size, image_size, backend)
        G = self.GATES * hidden_size
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.image_size, self.backend = image_size, backend
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if image_size is not None:
            self.weight_img = nn.Parameter(torch.empty(G, image_size, **factory))
        else:
            self.register_parameter("weight_img", None)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        _export.refuse_torchscript(self)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def _repr_items(self):
        return (("bias", True), *self.REPR_CELL)

    def _outer_bias(self):
        return summed_bias(self.bias_ih, self.bias_hh)

    def _step(self, xp, image_term, states, amp):
        """One step: xp [1, B, G*H] (the input side), image_term, states [h] or [h, c] -> states',
        computed in `amp` (the autocast dtype) or the parameters' dtype (None)."""
        raise NotImplementedError

    def _fast(self, input, hx, image):
        """One C++ call for a float32/float64 CPU step outside autocast, torch.func, forward AD and
        torch.compile (_decode_possible), batched or not. With gradients possible: csrc/cell_train.cpp,
        the whole step (products, gates, state update) one autograd node whose backward is one C++
        call (a double backward recomputes the step as aten ops: exact at every order). Otherwise the
        decoding kernel (csrc/cell_step.cpp: the weights read where they are, nothing packed or
        cached, so a weight changed in place is always seen). The arguments are checked in C++;
        None where that refuses one (or the call is outside these cases): the checked path below then
        gives the error, or runs the call."""
        engine = _decode_possible(input, self.backend)
        if engine is None:
            return None
        unbatched = input.dim() == 1
        if unbatched:
            input = input.unsqueeze(0)
        elif input.dim() != 2:
            return None
        if hx is None:
            h = c = input.new_zeros(input.shape[0], self.hidden_size)
        else:
            pair = self._fast_states(hx)
            if pair is None:
                return None
            h, c = pair
        if unbatched and hx is not None:
            if not (isinstance(h, torch.Tensor) and isinstance(c, (torch.Tensor, type(None)))):
                return None
            if h.dim() != 1 or (c is not None and c.dim() != 1):
                return None
            h, c = h.unsqueeze(0), None if c is None else c.unsqueeze(0)
        w_img = None
        if image is not None:
            if self.weight_img is None or not isinstance(image, torch.Tensor) or image.dim() != 2 - unbatched:
                return None
            w_img = self.weight_img
            if unbatched:
                image = image.unsqueeze(0)
        kernel = engine.cell_train if torch.is_grad_enabled() else engine.cell_step
        p = self._parameters  # the dict itself: nn.Module.__getattr__ costs ~2 us a name on a slow host
        try:
            h_new, c_new = kernel(self._step_kind(), input, h, c if self.STATES == 2 else None, image, p["weight_ih"],
                                  p["weight_hh"], w_img, p["bias_ih"], p["bias_hh"])
        except (RuntimeError, TypeError):  # a refused argument: the checked path says what is wrong
            return None
        if unbatched:
            h_new, c_new = h_new.squeeze(0), None if c_new is None else c_new.squeeze(0)
        return h_new if self.STATES == 1 else (h_new, c_new)

    def forward(self, input, hx=None, image=None):
        if type(input) is torch.Tensor:
            out = self._fast(input, hx, image)
            if out is not None:
                return out
        name = type(self).__name__
        if not _export.onnx_exporting():
            _export.refuse_tracing(self)
        if not isinstance(input, torch.Tensor):
            raise InputError(f"input: expected a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise InputError(f"input: {name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        if x.shape[1] != self.input_size:
            raise InputError(f"input: has inconsistent input_size: got {x.shape[1]} expected {self.input_size}")
        amp = _autocast_dtype(x.device, self.weight_ih.dtype)
        _check_same("input", x, self.weight_ih, "the parameters", dtype=amp is None)
        if hx is None:
            states = [x.new_zeros(B, self.hidden_size) for _ in range(self.STATES)]
        else:
            states = []
            for k, t in enumerate(self._hx_tensors(hx)):
                where = "hx" if self.STATES == 1 else f"hx[{k}] ({('h_0', 'c_0')[k]})"
                if not isinstance(t, torch.Tensor):
                    raise InputError(f"{where}: expected a tensor, got {type(t).__name__}")
                if t.dim() != input.dim():
                    raise InputError(f"{where}: expected a {input.dim()}-D tensor like input, got {t.dim()}-D")
                s = t if batched else t.unsqueeze(0)
                if tuple(s.shape) != (B, self.hidden_size):
                    want = (B, self.hidden_size) if batched else (self.hidden_size,)
                    raise InputError(f"{where}: expected shape {want}, got {tuple(t.shape)}")
                _check_same(where, s, x, "input", dtype=amp is None)
                states.append(s)
        img = _check_image(image, image_size=self.image_size, batched=batched, batch=B, steps=None,
                           batch_first=False, module=name)
        if img is not None:
            _check_same("image", img, x, "input", dtype=amp is None)
        if _export.onnx_exporting():
            _export.check_onnx_exportable(self, amp=amp)
            new = _export.onnx_cell(self, x, img, states)
        else:
            if not torch.compiler.is_compiling():
                _backends.select(self.backend, x.device, amp or x.dtype, self.CELL)
            xp, img_term = _project(x, img, self.weight_ih, self._outer_bias(), self.weight_img)
            new = self._step(_to(xp, amp).unsqueeze(0), _to(img_term, amp), [_to(s, amp) for s in states], amp)
        if amp is not None and x.device.type == "cpu":  # the dtypes torch's cell returns (AUTOCAST_FULL)
            new = [s.to(self.weight_ih.dtype if f else amp) for s, f in zip(new, self._autocast_full())]
        new = [s if batched else s.squeeze(0) for s in new]
        return new[0] if self.STATES == 1 else tuple(new)
