"""The one place that chooses a backend for the fused recurrences: one table keyed by cell and backend.

A backend holds, for each cell it implements ("rnn", "lstm", "gru"), a forward and a backward on
the time-major contract documented in ``mmrnn_ext.reference``:

    rnn   forward(xp, w_hh, h0, image_term, lengths, nonlinearity) -> out
          backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity) -> (dA, dh0)
    lstm  forward(xp, w_hh, h0, c0, image_term, lengths) -> (out, c_all, gates)
          backward(grad_out, grad_h_last, grad_c_last, out, c_all, gates, h0, c0, w_hh, lengths) -> (dG, dh0, dc0)
    gru   forward(xp, w_hh, b_hn, h0, image_term, lengths) -> (out, gates)
          backward(grad_out, grad_h_last, out, gates, h0, w_hh, lengths) -> (dGx, dhn, dh0)

A backend may also offer an Engine (the cpp backend does): the decoding step, the cell step with
gradients, the inference input product and inference with the input product fused into every step.
The modules reach them as ``select(...).engine`` or ``step_engine(backend)``, never by name.

Nothing outside this module branches on the backend (tests/test_layout.py checks that no other
module calls its private probes).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import reference
from .errors import InputTypeError

BACKEND_NAMES = ("cpp", "triton", "reference")
CELLS = ("rnn", "lstm", "gru")
_BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the mmrnn_ext source tree, with torch installed)"


@dataclass(frozen=True)
class CellImpl:
    forward: Callable
    backward: Callable
    infer: Callable | None = None  # a forward that saves nothing for backward (public outputs only)
    # backward also takes sums= (a [B, width] buffer in the carry dtype: float32, float64 for
    # float64) that it fills with each row's step gradients summed over time, the rnn's and lstm's
    # width their dA's, the gru's [dGx | dhn] (4H): a static image term's gradient without one more
    # pass over dA (csrc/common.h, step_sums_data)
    step_sums: bool = False


class Engine:
    """What a backend offers beyond the recurrences' forward and backward (the C++ engine on CPU
    tensors; no other backend has these yet). The modules use them through this object only. Each
    call looks its kernel up in the extension module when made (so a test can wrap one)."""

    def __init__(self, mod: ModuleType):
        self._mod = mod

    def linear(self, x, w, transpose_w=True):
        """x [..., K] @ w [N, K]^T: the modules' input product (float32); with transpose_w=False
        x [..., K] @ w [K, N]: its input gradient."""
        return self._mod.linear(x, w, transpose_w)

    def weight_grad(self, dA, x, h0, out, tail=None):
        """(sum_t dA_t^T x_t, sum_t dA_t^T h_{t-1}) for dA [T, B, M] (a column slice is read in place),
        x [T, B, I], h_{-1} = h0 [B, H], h_t = out[t]: the weight gradients of a layer in one pass over
        dA (float32, float64); None for a product whose operands are None. tail [T, B, R]: the second
        one's last R rows are sum_t tail_t^T h_{t-1} instead (the GRU's n rows of dW_hh)."""
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        return self._mod.weight_grad(dA, c(x), c(h0), c(out), tail)

    def outer_term(self, image, w_img, b_ih, b_hh, inner, batch):
        """image @ w_img^T + b_ih + b_hh [B, G] (a static image [B, V]; b_hh's last `inner` entries
        left out), or the biases over `batch` rows; None where there is neither (ops.common.FusedInputOp)."""
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        return self._mod.outer_term(c(image), c(w_img), c(b_ih), c(b_hh), inner, batch)

    def outer_grad(self, S, image, inner, bias):
        """(dW_img, d_b_ih, d_b_hh) of the outer term from the step sums S [B, G + inner]: S[:, :G]^T
        image (None without image), and with `bias` the biases' (b_hh's last `inner` from S[:, G:])."""
        return self._mod.outer_grad(S, None if image is None else image.contiguous(), inner, bias)

    def cell_step(self, *args):
        """One decoding step, no gradient (csrc/cell_step.cpp)."""
        return self._mod.cell_step(*args)

    def cell_train(self, *args):
        """One step as one autograd node (csrc/cell_train.cpp)."""
        return self._mod.cell_train(*args)

    def train_forward(self, cell: str):
        """The training forward of `cell` with the input product fused into every step (x and w_ih
        in, what BPTT reads out): the RNN's is its inference kernel (it saves only its outputs)."""
        return {"rnn": self._mod.rnn_infer, "lstm": self._mod.lstm_forward_fused,
                "gru": self._mod.gru_forward_fused}[cell]

    def infer(self, cell: str):
        """Inference of `cell` with the input product fused into every step (x and w_ih in; the GRU's
        float32 and float64 only: its tiles keep W_in x_t apart, which the reset gate does not scale)."""
        return getattr(self._mod, f"{cell}_infer")


@dataclass(frozen=True)
class Backend:
    name: str
    cells: dict  # cell name -> CellImpl, for the cells this backend implements
    dtypes: tuple  # dtypes it computes natively
    devices: tuple  # device types it runs on
    engine: Engine | None = None  # the step kernels and fused inference, where the backend has them


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --- availability, probed once -----------------------------------------------------------------

def _load_cpp() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("mmrnn_ext._C")
    except ImportError as exc:
        return None, f"the C++ extension mmrnn_ext._C is not built ({exc}); build it with: {_BUILD_COMMAND}"
    return mod, ("built; rnn, lstm, gru in float32, float64 and bfloat16 (float32 accumulation and state; the bf16 "
                 f"dot instruction where the CPU has it: this one runs {mod.cpu_isa()}) on CPU tensors (float16 goes "
                 "to 'reference'; LSTM with proj_size > 0 runs the reference step loop)"
                 + ("" if mod.parallel_build() else
                    "; compiled without OpenMP: every call runs on one thread"))


def _load_kernels() -> tuple[ModuleType | None, str]:
    """Import the Triton kernels: mmrnn_ext.kernels when installed (setup.py maps the top-level
    kernels/ folder there), else kernels/ beside the package in a source tree (PYTHONPATH use)."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed; install it with: pip install 'triton>=3.2'"
    try:
        return importlib.import_module("mmrnn_ext.kernels"), ""
    except ModuleNotFoundError as exc:
        if exc.name != "mmrnn_ext.kernels":
            return None, f"importing the Triton kernels failed: {exc}"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return None, f"the Triton kernels are missing (neither mmrnn_ext.kernels nor {src} exists); reinstall mmrnn_ext"
    spec = importlib.util.spec_from_file_location("mmrnn_ext.kernels", init, submodule_search_locations=[src])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mmrnn_ext.kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # a broken Triton install must not break the package's import
        del sys.modules["mmrnn_ext.kernels"]
        return None, f"importing the Triton kernels failed: {exc}"
    return mod, ""


_cache: dict = {}


def _cpp():
    if "cpp" not in _cache:
        _cache["cpp"] = _load_cpp()
    return _cache["cpp"]


def _kernels():
    if "triton" not in _cache:
        _cache["triton"] = _load_kernels()
    return _cache["triton"]


def _triton_status() -> tuple[bool, str]:
    mod, why = _kernels()
    if mod is None:
        return False, why
    if _triton_interpret():
        return True, ("TRITON_INTERPRET=1: the Triton kernels run on CPU tensors through the interpreter (slow; for "
                      "testing). " + _TRITON_CELLS)
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU tensors for testing)"
    return True, ("CUDA tensors; float32 (TF32 dots only where torch allows TF32), bfloat16, float16. "
                  + _TRITON_CELLS)


# What the Triton backend runs, per cell (backends()["triton"]["detail"]).
_TRITON_CELLS = ("rnn: persistent / cooperative / step forms (measured on an H100). lstm, gru: the same three "
                  "forms (persistent up to hidden 128 in 16-bit dtypes, 64 in float32), verified under Triton's "
                  "interpreter and compiled for sm_90 offline (bench/sm90_resources.py); their GPU run and timing "
                  "is bench/gpu_check.sh lstm gru. An LSTM with proj_size > 0 runs the reference step loop "
                  "on every device")


def backends() -> dict:
    """{name: {"available": bool, "cells": tuple, "auto_cells": tuple, "detail": str}} for "cpp", "triton" and
    "reference" (cells: what backend=name runs; auto_cells: what backend="auto" gives it — every backend
    runs every cell): what runs here and, for what does not, why not and what provides it."""
    cpp_mod, cpp_why = _cpp()
    tri_ok, tri_why = _triton_status()
    return {
        "cpp": {"available": cpp_mod is not None, "cells": CELLS, "auto_cells": CELLS, "detail": cpp_why},
        "triton": {"available": tri_ok, "cells": CELLS, "auto_cells": CELLS, "detail": tri_why},
        "reference": {"available": True, "cells": CELLS, "auto_cells": CELLS,
                      "detail": "plain PyTorch step loop, any device and dtype (low precision computed in float32)"},
    }


def cpu_cache(release: bool = False) -> dict:
    """The C++ engine's block cache for its large CPU buffers (csrc/buffers.h): {"cached": bytes held
    for reuse, "in_use": bytes in live tensors, "limit": the most it keeps (MMRNN_CPU_CACHE_MB; 0:
    off)}; release=True first frees every cached block (as torch.cuda.empty_cache does for CUDA's).
    All zeros where the extension is not built."""
    mod = _cpp()[0]
    if mod is None:
        return {"cached": 0, "in_use": 0, "limit": 0}
    if release:
        mod.buffer_cache_release()
    cached, in_use, limit = mod.buffer_cache_stats()
    return {"cached": cached, "in_use": in_use, "limit": limit}


def empty_cache() -> None:
    """Frees every block the C++ engine keeps for reuse (its large CPU buffers: csrc/buffers.h).
    Blocks in use are freed when their tensors die, as always."""
    cpu_cache(release=True)


# --- the backend objects -------------------------------------------------------------------------

_REFERENCE = Backend("reference", {
    "rnn": CellImpl(reference.reference_forward, reference.reference_backward),
    "lstm": CellImpl(reference.lstm_reference_forward, reference.lstm_reference_backward),
    "gru": CellImpl(reference.gru_reference_forward, reference.gru_reference_backward),
}, (torch.float64, torch.float32, torch.bfloat16, torch.float16), ("cpu", "cuda"))


def _cpp_backend() -> Backend:
    if "cpp_backend" in _cache:
        return _cache["cpp_backend"]
    mod, _ = _cpp()

    def rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity):
        return mod.rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity == "relu")

    def rnn_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity, sums=None):
        return tuple(mod.rnn_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity == "relu", sums))

    def rnn_infer(xp, w_hh, h0, image_term, lengths, nonlinearity):
        return tuple(mod.rnn_infer(xp, None, w_hh, h0, image_term, lengths, nonlinearity == "relu"))

    def lstm_infer(xp, w_hh, h0, c0, image_term, lengths):
        return tuple(mod.lstm_infer(xp, None, w_hh, h0, c0, image_term, lengths))

    def gru_infer(xp, w_hh, b_hn, h0, image_term, lengths):
        return tuple(mod.gru_infer(xp, None, w_hh, b_hn, h0, image_term, lengths))

    be = Backend("cpp", {
        "rnn": CellImpl(rnn_forward, rnn_backward, rnn_infer, step_sums=True),
        "lstm": CellImpl(lambda *a: tuple(mod.lstm_forward(*a)), lambda *a, sums=None: tuple(mod.lstm_backward(*a, sums)),
                         lstm_infer, step_sums=True),
        "gru": CellImpl(lambda *a: tuple(mod.gru_forward(*a)), lambda *a, sums=None: tuple(mod.gru_backward(*a, sums)),
                        gru_infer, step_sums=True),
    }, (torch.float64, torch.float32, torch.bfloat16), ("cpu",),
        Engine(mod))
    _cache["cpp_backend"] = be
    return be


def step_engine(backend: str) -> Engine | None:
    """The engine that runs a module's CPU steps (decoding, a cell with gradients) for its `backend`
    setting, or None: the cpp backend's, with "auto" or "cpp", where it is built. Called before every
    decoding step: two dictionary reads once probed."""
    if backend not in ("auto", "cpp") or _cpp()[0] is None:
        return None
    return _cpp_backend().engine


def cpu_engine_isa() -> str | None:
    """The vector path the C++ engine takes on this CPU (avx512_bf16, avx512, avx2, generic), or None
    where it is not built."""
    mod = _cpp()[0]
    return None if mod is None else mod.cpu_isa()


def _triton_backend() -> Backend:
    mod, _ = _kernels()
    devices = ("cuda", "cpu") if _triton_interpret() else ("cuda",)
    return Backend("triton", {"rnn": CellImpl(mod.rnn_forward, mod.rnn_backward),
                              "lstm": CellImpl(mod.lstm_forward, mod.lstm_backward),
                              "gru": CellImpl(mod.gru_forward, mod.gru_backward)},
                   (torch.float32, torch.bfloat16, torch.float16), devices)


def backend_for(tensor: torch.Tensor, backend: str = "auto", cell: str = "rnn") -> str:
    """The name of the backend that `backend` resolves to for `cell` on tensors like `tensor`."""
    return select(backend, tensor.device, tensor.dtype, cell).name


def select(backend: str, device: torch.device, dtype: torch.dtype, cell: str = "rnn") -> Backend:
    """The backend that runs `cell`'s recurrence for tensors on `device` of `dtype` (with its engine:
    the step kernels and fused inference, where it has them).

    backend="auto": triton on CUDA, cpp on CPU (float32/float64/bfloat16), each where it implements the
    cell; else reference. (Every call of a module asks: "auto"'s answer is remembered per device
    type, dtype, cell and TRITON_INTERPRET, since what is built and visible does not change.)"""
    if backend == "auto":
        # keyed also on the probed availabilities themselves (tests replace them)
        key = ("auto", device.type, dtype, cell, os.environ.get("TRITON_INTERPRET", ""), id(_cache.get("cpp")),
               id(_cache.get("triton")))
        found = _cache.get(key)
        if found is None:
            found = _cache[key] = _select(backend, device, dtype, cell)
        return found
    return _select(backend, device, dtype, cell)


def _select(backend: str, device: torch.device, dtype: torch.dtype, cell: str) -> Backend:
    if backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    status = backends()
    if backend == "auto":
        preferred = ("triton",) if device.type == "cuda" else ("cpp",)
        for name in preferred:
            if status[name]["available"]:
                candidate = _cpp_backend() if name == "cpp" else _triton_backend()
                if dtype in candidate.dtypes and device.type in candidate.devices:
                    return candidate
        return _REFERENCE
    if not status[backend]["available"]:
        raise RuntimeError(f"backend={backend!r} is not available here: {status[backend]['detail']}")
    chosen = {"cpp": _cpp_backend, "triton": _triton_backend}.get(backend, lambda: _REFERENCE)()
    if device.type not in chosen.devices:
        raise RuntimeError(f"backend={backend!r} runs on {chosen.devices} tensors, got tensors on {device}"
                           + ("; set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors" if backend == "triton" else ""))
    if dtype not in chosen.dtypes:
        names = " and ".join(str(d).replace("torch.", "") for d in chosen.dtypes)
        raise InputTypeError(f"backend={backend!r} computes {names}, got {dtype}; construct the module with "
                             f"backend='auto' (it picks a backend that runs {dtype}: {'triton on CUDA, ' if backend != 'triton' else ''}"
                             f"'reference' otherwise), or convert the model and inputs to one of {names}")
    return chosen
