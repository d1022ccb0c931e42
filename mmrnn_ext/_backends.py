"""The one place that chooses a backend for the fused recurrence.

A backend is an object with

    forward(xp, w_hh, h0, image_term, lengths, nonlinearity) -> out [T, B, H]
    backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity) -> (dA [T, B, H], dh0 [B, H])

on the time-major contract documented in ``mmrnn_ext.reference``. Nothing outside this module
branches on the backend.
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

BACKEND_NAMES = ("cpp", "triton", "reference")
_BUILD_COMMAND = "pip install --no-build-isolation -e .  (from the mmrnn_ext source tree, with torch installed)"


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple  # dtypes it computes natively
    devices: tuple  # device types it runs on


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --- availability, probed once -----------------------------------------------------------------

def _load_cpp() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("mmrnn_ext._C")
    except ImportError as exc:
        return None, f"the C++ extension mmrnn_ext._C is not built ({exc}); build it with: {_BUILD_COMMAND}"
    return mod, "built; float32 and float64 on CPU tensors (bfloat16/float16 go to 'reference')"


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
        return True, "TRITON_INTERPRET=1: the Triton kernels run on CPU tensors through the interpreter (slow; for testing)"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU tensors for testing)"
    return True, "CUDA tensors; float32 (TF32 dots only where torch allows TF32), bfloat16, float16"


def backends() -> dict:
    """{name: {"available": bool, "detail": str}} for "cpp", "triton" and "reference": what runs
    here and, for what does not, why not and what provides it."""
    cpp_mod, cpp_why = _cpp()
    tri_ok, tri_why = _triton_status()
    return {
        "cpp": {"available": cpp_mod is not None, "detail": cpp_why},
        "triton": {"available": tri_ok, "detail": tri_why},
        "reference": {"available": True, "detail": "plain PyTorch step loop, any device and dtype (low precision computed in float32)"},
    }


# --- the backend objects -------------------------------------------------------------------------

_REFERENCE = Backend("reference", reference.reference_forward, reference.reference_backward,
                     (torch.float64, torch.float32, torch.bfloat16, torch.float16), ("cpu", "cuda"))


def _cpp_backend() -> Backend:
    mod, _ = _cpp()

    def forward(xp, w_hh, h0, image_term, lengths, nonlinearity):
        return mod.rnn_forward(xp, w_hh, h0, image_term, lengths, nonlinearity == "relu")

    def backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity):
        return tuple(mod.rnn_backward(grad_out, grad_h_last, out, h0, w_hh, lengths, nonlinearity == "relu"))

    return Backend("cpp", forward, backward, (torch.float64, torch.float32), ("cpu",))


def _triton_backend() -> Backend:
    mod, _ = _kernels()
    devices = ("cuda", "cpu") if _triton_interpret() else ("cuda",)
    return Backend("triton", mod.rnn_forward, mod.rnn_backward,
                   (torch.float32, torch.bfloat16, torch.float16), devices)


def backend_for(tensor: torch.Tensor, backend: str = "auto") -> str:
    """The name of the backend that `backend` resolves to for tensors like `tensor`."""
    return select(backend, tensor.device, tensor.dtype).name


def select(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that runs the recurrence for tensors on `device` of `dtype`.

    backend="auto": triton on CUDA, cpp on CPU (float32/float64), else reference."""
    if backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {backend!r}")
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
        raise TypeError(f"backend={backend!r} computes {[str(d) for d in chosen.dtypes]}, got {dtype}; "
                        "use backend='auto' or 'reference' for this dtype")
    return chosen
