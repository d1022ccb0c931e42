"""The LSTM and GRU ops through each CPU backend against their plain-PyTorch definitions, forward and
every gradient; gradcheck; what backward saves; the C++ backend's size grid, long sequences and
determinism (its memory check, for every cell: test_cpp_backend.py); the float32 sigmoid's accuracy."""
import itertools

import pytest
import torch

from conftest import assert_close, require
from mmrnn_ext import gru_recurrence, lstm_recurrence
from mmrnn_ext.reference import gru_recurrence_ref, lstm_recurrence_ref

GATES = {"lstm": 4, "gru": 3}


def make_inputs(cell, T, B, H, image, dtype, lengths=False, noncontig=False, seed=0):
    """Inputs in the op's argument order: lstm (xp, w_hh, h0, c0, image_term), gru (xp, w_hh, b_hn,
    h0, image_term); plus lengths. noncontig: every tensor a strided slice of a wider one."""
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell] * H

    def rnd(*shape, scale=1.0):
        if noncontig:
            t = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=g, dtype=torch.float64)[..., 1::2]
        else:
            t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return (t * scale).to(dtype).requires_grad_()

    xp, w = rnd(T, B, G), rnd(G, H, scale=1.0 / max(H, 1) ** 0.5)
    img = None if image is None else (rnd(B, G) if image == "static" else rnd(T, B, G))
    states = [rnd(B, H, scale=0.5) for _ in range(2 if cell == "lstm" else 1)]
    args = [xp, w, *states, img] if cell == "lstm" else [xp, w, rnd(H, scale=0.3), *states, img]
    lens = None
    if lengths:
        lens = torch.randint(0, T + 1, (B,), generator=g)
        lens[0] = T
    return args, lens


def run_op(cell, backend, args, lens):
    if cell == "lstm":
        return lstm_recurrence(*args, lengths=lens, backend=backend)
    return gru_recurrence(*args, lengths=lens, backend=backend)


def run_ref(cell, args, lens):
    if cell == "lstm":
        xp, w, h0, c0, img = args
        return lstm_recurrence_ref(xp, w, h0, c0, img, lens)
    xp, w, b_hn, h0, img = args
    return gru_recurrence_ref(xp, w, h0, img, lens, b_hn)


def outputs_and_grads(fn, args):
    outs = fn(args)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum() for o in outs)
    inputs = [a for a in args if a is not None]
    return list(outs), list(torch.autograd.grad(loss, inputs))


def compare(cell, backend, T, B, H, image, dtype, lengths=False, noncontig=False, seed=0):
    args, lens = make_inputs(cell, T, B, H, image, dtype, lengths, noncontig, seed)
    outs, grads = outputs_and_grads(lambda a: run_op(cell, backend, a, lens), args)
    r_outs, r_grads = outputs_and_grads(lambda a: run_ref(cell, a, lens), args)
    for k, (a, b) in enumerate(zip(outs, r_outs)):
        assert_close(a, b, dtype, f"output {k}")
    for k, (a, b) in enumerate(zip(grads, r_grads)):
        assert_close(a, b, dtype, f"grad of input {k}")


SIZES = [(1, 1, 1), (5, 3, 7), (4, 1, 65), (33, 3, 7), (7, 17, 16)]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H", SIZES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in SIZES])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_backend_matches_reference(cpu_backend, cell, T, B, H, image, lengths, dtype):
    compare(cell, cpu_backend, T, B, H, image, dtype, lengths)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
def test_noncontiguous_inputs(cpu_backend, cell, image):
    compare(cell, cpu_backend, 6, 3, 7, image, torch.float64, lengths=True, noncontig=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_gradcheck(cpu_backend, cell, image, lengths):
    args, lens = make_inputs(cell, 5, 3, 7, image, torch.float64, lengths=lengths, seed=3)
    present = [i for i, a in enumerate(args) if a is not None]

    def fn(*ins):
        full = list(args)
        for i, t in zip(present, ins):
            full[i] = t
        return run_op(cell, cpu_backend, full, lens)

    assert torch.autograd.gradcheck(fn, [args[i] for i in present], eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lengths_semantics(cpu_backend, cell):
    """Past its length a row's output is zero and its final states are those at its last step."""
    args, _ = make_inputs(cell, 6, 3, 5, "step", torch.float64)
    lens = torch.tensor([6, 0, 2])
    outs = run_op(cell, cpu_backend, args, lens)
    full = run_ref(cell, args, None)
    out = outs[0]
    assert torch.equal(out[2:, 2], torch.zeros_like(out[2:, 2])) and torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    initial = args[2:4] if cell == "lstm" else args[3:4]
    for k, final in enumerate(outs[1:]):
        torch.testing.assert_close(final[1], initial[k][1], atol=0, rtol=0)
    torch.testing.assert_close(outs[1][2], full[0][1, 2], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[1][0], full[0][5, 0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zero_length_sequence_op_returns_initial_state(cpu_backend, cell):
    """At the op level T = 0 is allowed: an empty output and the initial states (the modules raise,
    as torch's do)."""
    args, _ = make_inputs(cell, 0, 2, 3, None, torch.float64)
    outs = run_op(cell, cpu_backend, args, None)
    assert outs[0].shape == (0, 2, 3)
    initial = args[2:4] if cell == "lstm" else args[3:4]
    for final, init in zip(outs[1:], initial):
        assert torch.equal(final, init) and final.data_ptr() != init.data_ptr()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_only_needed_gradients(cpu_backend, cell):
    args, _ = make_inputs(cell, 4, 3, 5, "static", torch.float64)
    for a in args[1:]:
        a.requires_grad_(False)
    gx, = torch.autograd.grad(run_op(cell, cpu_backend, args, None)[0].sum(), [args[0]])
    rx, = torch.autograd.grad(run_ref(cell, args, None)[0].sum(), [args[0]])
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_saves_no_projected_input(cpu_backend, cell):
    """Saved per step: h, c and the 4 activated gates (LSTM: 6H, as nn.LSTM's fused kernels), or h,
    r, z, n and W_hn h + b_hn (GRU: 5H) — never xp nor the image term."""
    T, B, H = 4, 3, 5
    args, _ = make_inputs(cell, T, B, H, "step", torch.float64)
    out = run_op(cell, cpu_backend, args, None)[0]
    saved = [s for s in out.grad_fn.saved_tensors if s is not None]
    per_step = sum(s.numel() for s in saved if s.dim() == 3) // (T * B * H)
    assert per_step == (6 if cell == "lstm" else 5)
    assert not any(s.data_ptr() in (args[0].data_ptr(), args[-1].data_ptr()) for s in saved)


# --- the C++ backend ------------------------------------------------------------------------------

GRID = list(itertools.product([1, 3], [1, 5, 33], [1, 7, 65, 256]))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B,T,H", GRID, ids=[f"B{b}-T{t}-H{h}" for b, t, h in GRID])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_grid_with_lengths(cell, B, T, H, image, dtype):
    require("cpp")
    compare(cell, "cpp", T, B, H, image, dtype, lengths=True)


def test_cpp_multithreaded_rows_match_reference():
    require("cpp")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cell in ("lstm", "gru"):
            compare(cell, "cpp", 3, 300, 64, "step", torch.float64, lengths=True)
    finally:
        torch.set_num_threads(threads)


def test_sigmoid_float32_accuracy():
    require("cpp")
    from mmrnn_ext import _C

    x = torch.cat([torch.linspace(-87, 87, 400_001), torch.logspace(-30, 1.9, 10_001), -torch.logspace(-30, 1.9, 10_001)])
    y = _C.sigmoid_float32(x).double()
    ref = torch.sigmoid(x.double())
    ulp = torch.finfo(torch.float32).eps
    rel = ((y - ref).abs() / ref.abs()).max().item()
    print(f"max relative error on [-87, 87]: {rel:.2e} ({rel / ulp:.1f} ulp)")
    assert rel <= 4 * ulp
    far = _C.sigmoid_float32(torch.tensor([-200.0, -100.0, 100.0, 200.0])).double()
    assert (far - torch.sigmoid(torch.tensor([-200.0, -100.0, 100.0, 200.0]).double())).abs().max() <= 2e-38
    special = _C.sigmoid_float32(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]))
    assert torch.isnan(special[0]) and special[1].item() == 1.0 and special[3].item() == 0.5
    assert 0.0 <= special[2].item() <= 2e-38


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpp_long_sequence_stays_finite_and_matches(cell):
    require("cpp")
    T, B, H = 10_000, 2, 16
    args, _ = make_inputs(cell, T, B, H, "static", torch.float32)
    args = [a.detach() for a in args]
    outs = run_op(cell, "cpp", args, None)
    ref = run_ref(cell, [a.double() for a in args], None)
    assert all(torch.isfinite(o).all() for o in outs)
    err = max((a.double() - b).abs().max().item() for a, b in zip(outs, ref))
    print(f"max abs diff over {T} steps: {err:.2e}")
    # the gates contract: rounding does not compound, so float32 stays at float32 accuracy
    assert err <= 1e-5
    args[0].requires_grad_()
    outs = run_op(cell, "cpp", args, None)
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(args[0].grad).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpp_results_identical_run_to_run(cell):
    require("cpp")
    args, lens = make_inputs(cell, 17, 5, 65, "step", torch.float32, lengths=True)
    results = []
    for _ in range(3):
        outs = run_op(cell, "cpp", args, lens)
        grads = torch.autograd.grad(sum(o.sum() for o in outs), [a for a in args if a is not None])
        results.append([*outs, *grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpp_rejects_what_it_cannot_run():
    require("cpp")
    from mmrnn_ext import _C

    xp = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="w_hh: expected shape"):
        _C.lstm_forward(xp, torch.randn(8, 3), torch.zeros(2, 2), torch.zeros(2, 2), None, None)
    with pytest.raises(RuntimeError, match="last dimension of 3"):
        _C.gru_forward(xp, torch.randn(6, 2), None, torch.zeros(2, 2), None, None)
    with pytest.raises(RuntimeError, match=r"lengths: expected values in \[0, 3\]"):
        _C.lstm_forward(xp, torch.randn(8, 2), torch.zeros(2, 2), torch.zeros(2, 2), None, torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        _C.gru_forward(xp[..., :6].half(), torch.randn(6, 2).half(), None, torch.zeros(2, 2).half(), None, None)
    with pytest.raises(RuntimeError, match="b_hn: expected shape"):
        _C.gru_forward(xp[..., :6].contiguous(), torch.randn(6, 2), torch.zeros(3), torch.zeros(2, 2), None, None)
