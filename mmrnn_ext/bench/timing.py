"""Timing: CPU providers taking turns, GPU do_bench, the spread of repeats and the rates a machine cannot reach."""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats: int) -> float:
    """Median milliseconds: triton.testing.do_bench on GPU; warm-up then the median of `repeats` on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(cpu_times_ms(fn, repeats))


def cpu_times_ms(fn, repeats: int) -> list:
    """`repeats` timings of fn in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


# Repeats of one measurement whose (max - min) / median exceeds this are reported as disagreeing
# (a busy machine); a rate above the machine's measured ceiling by more than the margin is impossible.
NOISY_SPREAD = 0.30
CEILING_MARGIN = 1.10


def spread(times) -> float:
    """(max - min) / median of repeated timings: 0 when they agree."""
    return (max(times) - min(times)) / statistics.median(times) if times and statistics.median(times) > 0 else 0.0


def side_by_side_stats(fns: dict, device, repeats: int) -> dict:
    """{name: {"ms": median, "min_ms", "spread"}}. On CPU the providers take turns: each round runs
    every provider twice, an untimed call then a timed one, so that a slow spell of a shared machine
    falls on every provider alike rather than on whichever was being timed, and every timed call
    follows a call of its own (the steady state of a served model, not the cost of switching from
    another provider's memory footprint). On GPU each is timed on its own (triton.testing.do_bench's
    median); min_ms and spread are then None."""
    if device.type == "cuda":
        return {name: {"ms": time_ms(fn, device, repeats), "min_ms": None, "spread": None} for name, fn in fns.items()}
    return {name: {"ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "spread": spread(t)}
            for name, t in cpu_turns(fns, repeats).items()}


def impossible_rate(gflops, ceiling, dtype_name: str) -> bool:
    """A float32/float64 GEMM rate the machine cannot reach (above its big-GEMM ceiling by more
    than CEILING_MARGIN): a timing the machine disturbed, never a speed."""
    return (gflops is not None and ceiling is not None and dtype_name in ("float32", "float64")
            and gflops > CEILING_MARGIN * ceiling)


def cpu_turns(fns: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: in each round every provider runs an untimed call, then a timed
    one (see side_by_side_stats)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
