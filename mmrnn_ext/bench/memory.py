"""Memory: the activations a training step saves, the peak of a call."""

from __future__ import annotations


import torch


def saved_activation_mb(fn) -> float:
    """MB of distinct tensors autograd saves for backward during one forward (parameters excluded)."""
    seen = {}

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2 ** 20


def peak_memory_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
