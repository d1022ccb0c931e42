"""The machine: the CPU's description, its GEMM ceiling, and the GEMM FLOPs and rates of a case."""

from __future__ import annotations

import datetime
import math
import os
import platform

import torch

import mmrnn_ext
from mmrnn_ext import _backends
from .cases import CELLS, Case, stock_name
from .timing import NOISY_SPREAD, cpu_times_ms, impossible_rate, side_by_side_stats

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU's model name, vendor and the vector-relevant flags (/proc/cpuinfo), and the vector
    path mmrnn_ext's engine takes on it."""
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_vendor": None, "cpu_flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    info["cpu_model"] = value
                elif key == "vendor_id":
                    info["cpu_vendor"] = value
                elif key == "flags":
                    info["cpu_flags"] = [f for f in CPU_FLAGS if f in value.split()]
                    break
    except OSError:
        pass
    info["engine_isa"] = _backends.cpu_engine_isa()
    return info


def gemm_ceiling(repeats: int = 5, n: int = 2048) -> dict:
    """The machine's big-GEMM rate in float32 GF/s: an n^3 product through torch.mm (the BLAS torch
    ships) and through oneDNN's linear with prepacked weights where torch has it, each the best of
    `repeats` (a ceiling, not a typical time); the better is the ceiling every GF/s figure is
    compared with."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    flop = 2.0 * n ** 3

    def best_ms(fn):
        return min(cpu_times_ms(fn, repeats))

    rates = {"torch.mm": flop / best_ms(lambda: torch.mm(a, b)) / 1e6}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
        onednn()
        rates["oneDNN linear"] = flop / best_ms(onednn) / 1e6
    except (AttributeError, RuntimeError):  # a torch without oneDNN's linear: torch.mm alone
        pass
    best = max(rates, key=rates.get)
    return {"gflops": rates[best], "by": best, "rates": rates, "n": n}


def machine_info(device: torch.device) -> dict:
    cpu_info = cpu_description()
    cpu = cpu_info["cpu_model"]
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
            **cpu_info, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32"] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return info


def gemm_gflop(case: Case, provider: str, pass_name: str) -> float | None:
    """GEMM GFLOP of one call (one layer, one direction only; None otherwise): the input projection
    (over I + V columns for the concatenating provider, I plus one [B, V] image GEMM for the others),
    the recurrence, and in backward its BPTT products, dW_hh and dW_ih (+ dW_img); the input needs
    no gradient here."""
    if case.layers != 1 or case.bidirectional:
        return None
    B, T, I, V, H = case.B, case.T, case.I, case.V, case.H
    G = CELLS[case.cell][2] * H
    width, image = (I + V, 0) if provider == stock_name(case.cell) else (I, V)
    forward = 2.0 * T * B * width * G + 2.0 * B * image * G + 2.0 * T * B * H * G
    backward = 2 * (2.0 * T * B * G * H) + 2.0 * T * B * width * G + 2.0 * B * image * G
    return (forward if pass_name == "forward" else forward + backward) / 1e9


def recurrence_vs_mm(case: Case, repeats: int, ceiling: float | None = None) -> dict:
    """The fused recurrence alone (auto backend, forward) against T plain GEMMs of its shape
    ([B, H] x [H, G*H], G the cell's gate count)."""
    B, T, H = case.B, case.T, case.H
    G = CELLS[case.cell][2] * H
    g = torch.Generator().manual_seed(1)
    xp = torch.randn(T, B, G, generator=g).to(case.device, case.dtype)
    w = (torch.randn(G, H, generator=g) / math.sqrt(H)).to(case.device, case.dtype)
    h0 = torch.zeros(B, H, device=case.device, dtype=case.dtype)
    a = torch.randn(B, H, generator=g).to(case.device, case.dtype)
    wt = w.t().contiguous()
    out = torch.empty(B, G, device=case.device, dtype=case.dtype)
    run = {"rnn": lambda: mmrnn_ext.rnn_recurrence(xp, w, h0), "lstm": lambda: mmrnn_ext.lstm_recurrence(xp, w, h0, h0),
           "gru": lambda: mmrnn_ext.gru_recurrence(xp, w, None, h0)}[case.cell]

    def op():
        with torch.no_grad():
            run()

    def mm():
        for _ in range(T):
            torch.mm(a, wt, out=out)

    flop = 2.0 * B * H * G * T
    stats = side_by_side_stats({"op": op, "mm": mm}, case.device, repeats)
    op_ms, mm_ms = stats["op"]["ms"], stats["mm"]["ms"]
    dtype_name = str(case.dtype).replace("torch.", "")
    rates = (flop / op_ms / 1e6, flop / mm_ms / 1e6)
    spreads = [stats[k]["spread"] for k in ("op", "mm") if stats[k]["spread"] is not None]
    impossible = any(impossible_rate(r, ceiling, dtype_name) for r in rates)
    return {"shape": list(case.shape), "cell": case.cell, "dtype": dtype_name,
            "backend": _backends.backend_for(xp, cell=case.cell), "recurrence_ms": op_ms,
            "recurrence_gflops": rates[0], "mm_ms": mm_ms, "mm_gflops": rates[1],
            "fraction_of_mm": None if impossible else mm_ms / op_ms, "spread": max(spreads, default=None),
            "impossible_rate": impossible, "noisy": impossible or max(spreads, default=0.0) > NOISY_SPREAD}
