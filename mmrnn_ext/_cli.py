"""What mmrnn-train and mmrnn-bench check before any work: argument values, optional dependencies,
the device, and that output paths can be written. Every failure is one line naming the option."""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch


def _number_type(convert, accept, expected: str):
    """An argparse type: `convert` the text, then keep it if `accept(value)`; otherwise one message
    saying what was `expected` and what was given."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number_type(float, lambda v: 0 < v < float("inf"), "a positive finite number")
non_negative_float = _number_type(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
probability = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def require(prog: str, modules: dict, extra: str) -> None:
    """Exit with one line naming the missing modules (with what each is for) and the extra that
    installs them, before any work. modules: {import name: what it is needed for}."""
    missing = [f"{name} ({why})" for name, why in modules.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{prog}: missing optional dependencies: {', '.join(missing)}; "
                         f'install them with: pip install "mmrnn_ext[{extra}]"')


def device(prog: str, name: str | None) -> torch.device:
    """--device: cpu or cuda[:k], available here (default: cuda when available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"{prog}: --device: expected cpu or cuda, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"{prog}: --device: expected cpu or cuda, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"{prog}: --device {name}: no CUDA device is visible to torch (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"{prog}: --device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def writable_file(prog: str, flag: str, path: str | None) -> None:
    """An output file's folder must exist and be writable, and the path must not be a folder."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"{prog}: {flag} {path}: is a folder, expected a file path")
    if not os.path.isdir(folder):
        raise SystemExit(f"{prog}: {flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"{prog}: {flag} {path}: the folder {folder} is not writable")


def writable_folder(prog: str, flag: str, path: str) -> None:
    """An output folder: created if missing; it must then be a writable folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"{prog}: {flag} {path}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise SystemExit(f"{prog}: {flag} {path}: the folder is not writable")
