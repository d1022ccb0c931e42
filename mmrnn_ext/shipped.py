"""Loading a shipped model with its inputs checked: ``mmrnn_ext.load_exported(path)``.

An AOTInductor package (``model.pt2``) runs compiled code that reads its inputs in the layout,
dtype and sizes it was compiled for: fed an image one column too wide, or float64, it returns
scores made from the wrong bytes. ONNX Runtime checks shapes and dtypes but not values (a length
past the sequence, a token id past the vocabulary). ``load_exported`` reads the input contract an
export carries in its own metadata (``mmrnn.spec``, written by ``mmrnn-train --export`` and
``spec_metadata``) and checks every call against it before the model runs: each input's rank,
dtype, fixed sizes, the sizes inputs share (the batch, the number of steps), value ranges
(token ids below the vocabulary size, lengths in [0, steps]), the device (CPU) — one
``InputError`` naming the input, what was expected and what was given. Non-contiguous tensors are
copied to contiguous ones (the values the model sees are the caller's). For a ``.pt2`` package
AOTInductor's own checks are switched on too (``AOTI_RUNTIME_CHECK_INPUTS=1`` unless the
environment already sets it) and their message is rewritten to name the input.

The spec (JSON): {"inputs": [{"name": ..., "dtype": "int64" | "float32" | ...,
"shape": [int or dim name, ...], "min": number or dim name (optional), "max": ...}, ...]}.
"""
from __future__ import annotations

import json
import os
import re

import torch

from .ops import InputError, InputTypeError

SPEC_KEY = "mmrnn.spec"
_AOTI_CHECKS = "AOTI_RUNTIME_CHECK_INPUTS"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def input_spec(inputs: list) -> str:
    """The metadata value (JSON) of an input contract: a list of {"name", "dtype", "shape"[, "min",
    "max"]} dicts, checked here so that a malformed contract fails at export, not when loading."""
    names = set()
    for entry in inputs:
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"input_spec: {entry['name']}: dtype expected one of {list(_DTYPES)}, got {entry['dtype']!r}")
        if entry["name"] in names:
            raise ValueError(f"input_spec: the input name {entry['name']!r} appears twice")
        names.add(entry["name"])
    return json.dumps({"inputs": inputs})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ExportedModel:
    """A shipped model (``.pt2`` AOTInductor package or ``.onnx`` file) whose every call is checked
    against the input contract in its metadata. ``model(*inputs)`` or ``model(name=tensor, ...)``
    -> the model's output (a tensor, or a tuple of them when it has several).

    Attributes: ``path``, ``kind`` ("pt2" or "onnx"), ``inputs`` (the contract), ``metadata`` (every
    key the export carries, e.g. ``mmrnn.vocab`` and ``mmrnn.labels`` of an mmrnn-train export)."""

    def __init__(self, path: str, kind: str, run, metadata: dict):
        self.path, self.kind, self._run, self.metadata = path, kind, run, metadata
        if SPEC_KEY not in metadata:
            raise InputError(f"load_exported: {path}: no input contract ({SPEC_KEY}) in its metadata: it was not "
                             f"written by mmrnn-train --export (re-export it with this version), or was exported "
                             f"without one")
        self.inputs = json.loads(metadata[SPEC_KEY])["inputs"]
        self.input_names = [e["name"] for e in self.inputs]

    def __repr__(self):
        sig = ", ".join(f"{e['name']}: {e['dtype']} {e['shape']}" for e in self.inputs)
        return f"ExportedModel({self.path!r}, {self.kind}; {sig})"

    def check(self, *args, **kwargs) -> list:
        """The inputs in the contract's order, checked (see the module docstring), made contiguous."""
        names = self.input_names
        if len(args) > len(names):
            raise InputError(f"{self.path}: expected {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        given = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names:
                raise InputError(f"{key}: not an input of {self.path} (its inputs: {', '.join(names)})")
            if key in given:
                raise InputError(f"{key}: given twice (by position and by name)")
            given[key] = value
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"{', '.join(missing)}: missing (the inputs of {self.path}: {', '.join(names)})")
        sizes, source = {}, {}  # named dims: their value and the input that fixed it
        tensors = []
        for entry in self.inputs:
            name, t = entry["name"], given[entry["name"]]
            if not isinstance(t, torch.Tensor):
                raise InputTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            want = _DTYPES[entry["dtype"]]
            if t.dtype != want:
                raise InputTypeError(f"{name}: expected dtype {entry['dtype']}, got {_dtype_name(t.dtype)} "
                                     f"(nothing is cast: convert it with .to(torch.{entry['dtype']}) if that is meant)")
            if t.device.type != "cpu":
                raise InputError(f"{name}: expected a CPU tensor (the export runs on the CPU), got one on {t.device}")
            shape = entry["shape"]
            if t.dim() != len(shape):
                raise InputError(f"{name}: expected {len(shape)} dims {_shape_text(shape)}, got {t.dim()} dims "
                                 f"{list(t.shape)}")
            for k, (dim, n) in enumerate(zip(shape, t.shape)):
                if isinstance(dim, int):
                    if n != dim:
                        raise InputError(f"{name}: expected size {dim} at dim {k} {_shape_text(shape)}, got {n} "
                                         f"(shape {list(t.shape)})")
                elif dim in sizes:
                    if n != sizes[dim]:
                        raise InputError(f"{name}: expected {dim} = {sizes[dim]} at dim {k} (as in {source[dim]}), "
                                         f"got {n} (shape {list(t.shape)})")
                else:
                    if n < 1:
                        raise InputError(f"{name}: expected {dim} >= 1 at dim {k}, got {n}")
                    sizes[dim], source[dim] = n, name
            tensors.append(t if t.is_contiguous() else t.contiguous())
        for entry, t in zip(self.inputs, tensors):
            lo, hi = (entry.get(k) for k in ("min", "max"))
            if (lo is None and hi is None) or t.numel() == 0:
                continue
            lo_v, hi_v = (sizes.get(b, b) if isinstance(b, str) else b for b in (lo, hi))
            bad = torch.zeros_like(t, dtype=torch.bool)
            if lo_v is not None:
                bad |= t < lo_v
            if hi_v is not None:
                bad |= t > hi_v
            if t.is_floating_point():
                bad |= ~torch.isfinite(t)
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0])
                bound = lambda b, v: "" if b is None else (f"{b} = {v}" if isinstance(b, str) else f"{v}")  # noqa: E731
                raise InputError(f"{entry['name']}: expected values in [{bound(lo, lo_v) or '-inf'}, "
                                 f"{bound(hi, hi_v) or 'inf'}], got {entry['name']}{list(index)} = {t[index].item()}")
        return tensors

    def __call__(self, *args, **kwargs):
        tensors = self.check(*args, **kwargs)
        try:
            return self._run(tensors)
        except RuntimeError as exc:
            raise self._named(exc) from exc

    def _named(self, exc: RuntimeError) -> Exception:
        """AOTInductor's 'input_handles[k]: ...' as an InputError naming input k."""
        m = re.search(r"input_handles\[(\d+)\]: ([^\n]*)", str(exc))
        if m is None or int(m.group(1)) >= len(self.inputs):
            return exc
        return InputError(f"{self.inputs[int(m.group(1))]['name']}: {m.group(2).strip()} "
                          f"(AOTInductor's input check of {self.path})")


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def load_exported(path: str) -> ExportedModel:
    """Load ``model.pt2`` (AOTInductor; mmrnn_ext imported, as its custom ops need) or ``model.onnx``
    (ONNX Runtime's CPUExecutionProvider; needs ``mmrnn_ext[export]``) written by ``mmrnn-train
    --export`` -> an ExportedModel whose calls check their inputs against the contract in the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"load_exported: path: expected a model.pt2 or model.onnx file, got {path!r} "
                         f"({'a folder' if os.path.isdir(path) else 'no such file'})")
    if path.endswith(".onnx"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(f'load_exported: {path}: an ONNX file needs onnxruntime: pip install "mmrnn_ext[export]"') from None
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in session.get_inputs()]

        def run(tensors):
            outs = session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})
            outs = tuple(torch.from_numpy(o) for o in outs)
            return outs[0] if len(outs) == 1 else outs

        model = ExportedModel(path, "onnx", run, metadata)
        if names != model.input_names:
            raise InputError(f"load_exported: {path}: the graph's inputs {names} are not its contract's "
                             f"{model.input_names}")
        return model
    if not path.endswith(".pt2"):
        raise InputError(f"load_exported: path: expected a file ending in .pt2 (AOTInductor) or .onnx, got {path!r}")
    if not hasattr(torch._inductor, "aoti_load_package"):
        raise InputError(f"load_exported: {path}: torch {torch.__version__} cannot load AOTInductor packages")
    # AOTInductor's own input checks (read once per package, at its first call): a second line of defence
    os.environ.setdefault(_AOTI_CHECKS, "1")
    package = torch._inductor.aoti_load_package(path)
    metadata = package.get_metadata() if hasattr(package, "get_metadata") else {}
    return ExportedModel(path, "pt2", lambda tensors: package(*tensors), dict(metadata))
