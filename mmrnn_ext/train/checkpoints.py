"""mmrnn-train's checkpoints: model.pt holds weights, vocabulary, labels, config and the data's record,
sealed with a content digest; loaded as data only (torch.load(weights_only=True)), never code."""
from __future__ import annotations

import hashlib
import json
import os

import torch

from .loop import build_model


CHECKPOINT_FORMAT = "mmrnn-train/2"


def content_digest(meta: dict, state_dict: dict) -> str:
    """sha256 over the metadata (JSON, sorted keys) and every stored tensor's name, dtype, shape and
    bytes: any changed byte of what a checkpoint holds changes it."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, config, dataset):
    """model.pt: weights, vocabulary, labels, config and what evaluation needs to rebuild the test
    split (the data's kind, seed, split rule, file fingerprints, the test split's digest), sealed
    with a content digest that load_checkpoint verifies."""
    from ..data import split_digest

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "config": config, "vocab": list(dataset.vocab),
            "labels": list(dataset.labels), "data": dict(dataset.source, test_digest=split_digest(dataset.test))}
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(dict(meta, state_dict=state, digest=content_digest(meta, state)), path)


def load_checkpoint(path, device="cpu", backend=None):
    """-> (model, config, vocab, labels, data). A checkpoint is data: torch.load(weights_only=True);
    its content digest must match what it holds. Every failure is a one-line ValueError. backend:
    how to run the model here (default: as it was trained); the backend is not part of the model, so
    a checkpoint trained on a GPU's Triton kernels evaluates on a CPU and back."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r}: the file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never repeat torch's advice to load without weights_only
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function
            raise ValueError(f"checkpoint {path!r}: holds Python objects other than tensors and plain data; "
                             "mmrnn-train loads checkpoints as data only, never code, and refuses it") from None
        raise ValueError(f"checkpoint {path!r} cannot be read: not a complete torch checkpoint (truncated or "
                         f"damaged; {type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path!r}: expected format {CHECKPOINT_FORMAT!r}, got {found!r}"
                         + (" (written by an earlier mmrnn-train: retrain it)" if str(found).startswith("mmrnn-train/") else ""))
    keys = ("format", "config", "vocab", "labels", "data", "state_dict", "digest")
    if set(ckpt) != set(keys) or not isinstance(ckpt["state_dict"], dict):
        raise ValueError(f"checkpoint {path!r}: expected the entries {list(keys)}, got {sorted(ckpt)}")
    meta = {k: ckpt[k] for k in keys if k not in ("state_dict", "digest")}
    try:
        digest = content_digest(meta, ckpt["state_dict"])
    except (TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {path!r}: malformed contents ({type(exc).__name__})") from None
    if digest != ckpt["digest"]:
        raise ValueError(f"checkpoint {path!r}: content digest mismatch: its weights or metadata changed after it "
                         "was saved (damaged or edited)")
    config = ckpt["config"]
    model = build_model(config if backend is None else dict(config, backend=backend))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own config: {str(exc)[:300]}") from None
    return model.to(device), config, ckpt["vocab"], ckpt["labels"], ckpt["data"]
