"""pytest-benchmark suite: the same providers as `mmrnn-bench`, one benchmark per
(shape, provider, pass), grouped by shape and pass so that runs compare with --benchmark-compare.

    pytest bench/ --benchmark-only                     the CPU grid (CUDA grid on a GPU machine)
    MMRNN_BENCH_QUICK=1 pytest bench/ --benchmark-only the quick grid
    MMRNN_BENCH_QUICK=1 pytest bench/ --benchmark-disable   every case once, untimed (the test suite
                                                      runs this: tests/test_bench_cli.py)
"""
import os

import pytest
import torch

from mmrnn_ext import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("MMRNN_BENCH_QUICK", "0") not in ("", "0")
SHAPES = {("cpu", False): bench.CPU_GRID, ("cpu", True): bench.QUICK_CPU_GRID,
          ("cuda", False): bench.GPU_GRID, ("cuda", True): bench.QUICK_GPU_GRID}[(DEVICE.type, QUICK)]
PROVIDERS = [bench.OURS, "nn.RNN(concat)", "eager loop"]
# the CLI's own parser, so that an option added to mmrnn-bench cannot be missing here
OPTIONS = bench.parse_args(["--no-compile", "--device", DEVICE.type])

_cache = {}


def _providers(shape):
    if shape not in _cache:
        _cache.clear()  # one shape's models and inputs alive at a time
        case = bench.Case(*shape, dtype=torch.float32, device=DEVICE)
        _cache[shape] = bench.make_providers(case, OPTIONS)[0]
    return _cache[shape]


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[",".join(map(str, s)) for s in SHAPES])
def test_provider(benchmark, shape, provider, pass_name):
    fn = _providers(shape)[provider]
    benchmark.group = f"{','.join(map(str, shape))} {pass_name} float32 {DEVICE.type}"
    if pass_name == "forward":
        def run():
            with torch.no_grad():
                fn()
    else:
        def run():
            out = fn()
            out.backward(torch.ones_like(out))
    if DEVICE.type == "cuda":
        inner = run

        def run():
            inner()
            torch.cuda.synchronize()
    benchmark.pedantic(run, warmup_rounds=1, rounds=5 if not QUICK else 3, iterations=1)
