"""The C++ CPU backend: the size grid of its issue, long sequences, memory (every cell), determinism
and the accuracy of its vectorised float32 tanh (the LSTM's and GRU's own: test_gated_ops.py)."""
import gc
import itertools
import resource

import pytest
import torch

import mmrnn_ext
from conftest import require
from mmrnn_ext import rnn_recurrence
from mmrnn_ext.reference import rnn_recurrence_ref
from op_cases import compare_with_reference, make_inputs


@pytest.fixture(autouse=True)
def _cpp():
    require("cpp")


GRID = list(itertools.product([1, 3], [1, 5, 33], [1, 7, 65, 256]))


@pytest.mark.parametrize("B,T,H", GRID, ids=[f"B{b}-T{t}-H{h}" for b, t, h in GRID])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_grid_tanh_with_lengths(B, T, H, image, dtype):
    compare_with_reference("cpp", T, B, H, image, dtype, "tanh", lengths=True)


@pytest.mark.parametrize("B,T,H", [(3, 33, 65), (1, 5, 256)], ids=["B3-T33-H65", "B1-T5-H256"])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_grid_relu_and_noncontiguous(B, T, H, image, lengths):
    compare_with_reference("cpp", T, B, H, image, torch.float32, "relu", lengths, noncontig=True)


def test_multithreaded_rows_match_reference():
    """Batch x hidden large enough that the elementwise pass is split across threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compare_with_reference("cpp", 3, 300, 128, "step", torch.float64, "tanh", lengths=True)
    finally:
        torch.set_num_threads(threads)


def test_tanh_float32_accuracy():
    from mmrnn_ext import _C

    x = torch.cat([torch.linspace(-20, 20, 400_001), torch.logspace(-30, 1, 10_001), -torch.logspace(-30, 1, 10_001)])
    y = _C.tanh_float32(x).double()
    ref = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps
    rel = ((y - ref).abs() / ref.abs().clamp_min(torch.finfo(torch.float32).tiny)).max().item()
    print(f"max relative error {rel:.2e} ({rel / ulp:.1f} ulp)")
    assert rel <= 4 * ulp
    special = _C.tanh_float32(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 100.0, -100.0]))
    assert torch.isnan(special[0])
    assert special[1:].tolist() == [1.0, -1.0, 0.0, 1.0, -1.0]


def test_long_sequence_stays_finite_and_matches():
    T, B, H = 10_000, 2, 16
    xp, w, h0, img, _ = [None if a is None else a.detach() for a in make_inputs(T, B, H, "static", torch.float32)]
    out, h_last = rnn_recurrence(xp, w, h0, img, backend="cpp")
    ref, ref_last = rnn_recurrence_ref(xp.double(), w.double(), h0.double(), img.double())
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    print(f"max abs diff over {T} steps: {err:.2e}")
    # tanh contracts: rounding does not compound, so float32 stays at float32 accuracy
    assert err <= 1e-5
    xp.requires_grad_()
    out, h_last = rnn_recurrence(xp, w, h0, img, backend="cpp")
    (out.sum() + h_last.sum()).backward()
    assert torch.isfinite(xp.grad).all()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("mode", ["train", "inference"])
def test_memory_stays_flat(cell, mode):
    m = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell](32, 64, num_layers=2, image_size=16,
                                                                                backend="cpp")
    x = torch.randn(50, 8, 32)
    img = torch.randn(8, 16)

    def step():
        if mode == "inference":
            with torch.no_grad():
                m(x, image=img)
            return
        out, h = m(x, image=img)
        (out.sum() + sum(s.sum() for s in (h if isinstance(h, tuple) else (h,)))).backward()
        m.zero_grad(set_to_none=True)

    for _ in range(20):  # allocator warm-up
        step()
    gc.collect()
    before = _rss_mb()
    for _ in range(200):
        step()
    gc.collect()
    growth = _rss_mb() - before
    print(f"resident memory growth over 200 {mode} calls: {growth:.2f} MB")
    assert growth < 16


def test_results_identical_run_to_run():
    args = [None if a is None else a.detach().requires_grad_() if a.is_floating_point() else a
            for a in make_inputs(17, 5, 65, "step", torch.float32, lengths=True)]
    results = []
    for _ in range(3):
        out, h = rnn_recurrence(*args, backend="cpp")
        grads = torch.autograd.grad(out.sum() + h.sum(), [a for a in args[:4]])
        results.append([out, h, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpp_rejects_what_it_cannot_run():
    from mmrnn_ext import _C

    xp = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match="w_hh: expected shape"):
        _C.rnn_forward(xp, torch.randn(4, 5), torch.zeros(2, 4), None, None, False)
    with pytest.raises(RuntimeError, match=r"lengths: expected values in \[0, 3\]"):
        _C.rnn_forward(xp, torch.randn(4, 4), torch.zeros(2, 4), None, torch.tensor([1, 4]), False)
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        _C.rnn_forward(xp.half(), torch.randn(4, 4).half(), torch.zeros(2, 4).half(), None, None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.rnn_forward(xp.transpose(0, 1), torch.randn(4, 4), torch.zeros(3, 4), None, None, False)


def _big_lstm_step(m, x, img):
    """One training step whose engine buffers (out, c, gates, the input product, BPTT's gradient)
    are each 2 MB or more: the block cache's sizes."""
    out, (h, c) = m(x, image=img)
    (out.sum() + h.sum() + c.sum()).backward()
    return out.detach().clone(), [p.grad.clone() for p in m.parameters()]


def test_block_cache_reuses_and_frees():
    """The engine's large buffers come from its block cache: after a step every block is back in the
    cache (none in use), a second step reuses them (the cache does not grow) and gives the same
    bits, release frees them all, and a tensor from it resizes like any other."""
    torch.manual_seed(0)
    m = mmrnn_ext.LSTM(48, 192, image_size=8, backend="cpp")
    x, img = torch.randn(60, 48, 48), torch.randn(48, 8)  # [60, 48, 4 * 192] float32: 8.8 MB
    mmrnn_ext.empty_cache()
    first = _big_lstm_step(m, x, img)
    stats = mmrnn_ext.cpu_cache()
    assert stats["in_use"] == 0 and stats["cached"] >= 8 << 20 and stats["limit"] > 0
    m.zero_grad(set_to_none=True)
    second = _big_lstm_step(m, x, img)
    assert mmrnn_ext.cpu_cache()["cached"] == stats["cached"]
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert mmrnn_ext.cpu_cache(release=True) == {"cached": 0, "in_use": 0, "limit": stats["limit"]}
    with torch.no_grad():
        y = m(x, image=img)[0]  # inference: its output from the cache
    assert mmrnn_ext.cpu_cache()["in_use"] > 0
    y.resize_(80, 48, 192)[60:] = 1.0
    assert y.shape == (80, 48, 192) and bool(y[60:].eq(1).all())
    del y
    assert mmrnn_ext.cpu_cache()["in_use"] == 0


@pytest.mark.parametrize("setting,expect", [("0", "off"), ("4", "limit"), ("lots", "error")])
def test_block_cache_limit_setting(setting, expect):
    """MMRNN_CPU_CACHE_MB: 0 turns the cache off (torch's allocator for every buffer), a number caps
    what it keeps, anything else is refused by name (read once per process: a fresh one here)."""
    import ast
    import os
    import subprocess
    import sys

    code = ("import torch, mmrnn_ext\n"
            "m = mmrnn_ext.LSTM(48, 192, image_size=8, backend='cpp')\n"
            "out, (h, c) = m(torch.randn(60, 48, 48), image=torch.randn(48, 8))\n"
            "(out.sum() + h.sum()).backward()\n"
            "del out, h, c\n"
            "print(mmrnn_ext.cpu_cache())\n")
    env = dict(os.environ, MMRNN_CPU_CACHE_MB=setting)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if expect == "error":
        assert proc.returncode != 0 and "MMRNN_CPU_CACHE_MB: expected a whole number of MB >= 0, got 'lots'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    stats = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    if expect == "off":
        assert stats == {"cached": 0, "in_use": 0, "limit": 0}
    else:
        assert stats["limit"] == 4 << 20 and 0 < stats["cached"] <= 4 << 20 and stats["in_use"] == 0
