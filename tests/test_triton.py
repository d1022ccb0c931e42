"""The Triton kernels (step and persistent forms, forward and backward) against the reference.

Without CUDA they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1),
which is how CI checks them; the tests marked `gpu` run the compiled kernels and skip without CUDA."""
import itertools
import os

import pytest
import torch

import mmrnn_ext
from conftest import require
from op_cases import compare_with_reference, make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter twin of the GPU tests: needs TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def form(request, monkeypatch):
    require("triton")
    monkeypatch.setenv("MMRNN_TRITON_FORM", request.param)
    return request.param


FORMS = ["step", "persistent", "cooperative"]
GRID = list(itertools.product([1, 3, 17], [1, 4], [16, 48, 80]))


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("B,T,H", GRID, ids=[f"B{b}-T{t}-H{h}" for b, t, h in GRID])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_interpreted_kernels_match_reference(form, B, T, H, image, nonlinearity, lengths):
    compare_with_reference("triton", T, B, H, image, torch.float32, nonlinearity, lengths)


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
def test_interpreted_noncontiguous(form):
    compare_with_reference("triton", 4, 3, 16, "step", torch.float32, lengths=True, noncontig=True)


def _relative_check(rel_tol):
    """Norm-wise relative error ||a - b|| / ||b|| <= rel_tol, b computed in float64 (printed first,
    with the element-wise max, so a failure explains itself)."""
    def check(actual, expected, dtype, what):
        if actual is None or expected is None:
            assert actual is None and expected is None, what
            return
        diff = actual.double() - expected.double()
        scale = expected.double().norm().item()
        rel = diff.norm().item() / scale if scale > 0 else diff.norm().item()
        print(f"{what}: relative error {rel:.2e} (tolerance {rel_tol:.0e}); max abs diff {diff.abs().max().item():.2e}")
        assert rel <= rel_tol, f"{what}: relative error {rel:.3e} > {rel_tol:.0e}"
    return check


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreted_low_precision(form, dtype):
    compare_with_reference("triton", 4, 17, 48, "static", dtype, "tanh", lengths=True,
                           tol=_relative_check(1e-2), ref_dtype=torch.float64)


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
def test_interpreted_tf32_rounding(form, monkeypatch):
    """The TF32 path (float32 operands rounded to TF32, then the tensor-core dot): under the
    interpreter the dot of rounded operands is exact, i.e. what the GPU computes; it must stay within
    the TF32 tolerance of float64 and visibly differ from full precision."""
    from mmrnn_ext.kernels import launch, rnn

    monkeypatch.setattr(launch, "allow_tf32", lambda dtype, device_type="cuda": dtype == torch.float32)
    compare_with_reference("triton", 6, 17, 80, "step", torch.float32, "tanh", True,
                           tol=_relative_check(5e-4), ref_dtype=torch.float64)
    xp, w, h0, img, lens = [None if a is None else a.detach() for a in make_inputs(6, 17, 80, "step", torch.float32)]
    tf32_out = rnn.rnn_forward(xp, w, h0, img, None, "tanh")
    monkeypatch.setattr(launch, "allow_tf32", lambda dtype, device_type="cuda": False)
    full = rnn.rnn_forward(xp, w, h0, img, None, "tanh")
    rel = ((tf32_out - full).norm() / full.norm()).item()
    assert 1e-5 < rel < 5e-4, rel


@needs_interpreter
def test_forms_agree_and_choice_by_size():
    require("triton")
    from mmrnn_ext import kernels

    assert kernels.choose_form(128, torch.float32) == "persistent"
    assert kernels.choose_form(256, torch.float32) == "cooperative"
    assert kernels.choose_form(256, torch.bfloat16) == "persistent"
    assert kernels.choose_form(512, torch.bfloat16) == "cooperative"
    assert kernels.choose_form(512, torch.bfloat16, "persistent") == "persistent"
    assert kernels.choose_form(512, torch.bfloat16, "step") == "step"
    with pytest.raises(ValueError, match="form"):
        kernels.choose_form(64, torch.float32, "fastest")
    args = make_inputs(4, 3, 48, "step", torch.float32, lengths=True)
    outs = [kernels.rnn_forward(*[None if a is None else a.detach() for a in args], "tanh", form=f) for f in FORMS]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=1e-6, rtol=1e-6)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_cooperative_tiles_fit_the_resident_programs(monkeypatch):
    """The cooperative form's grid never exceeds the programs that can be resident at once (its
    grid barrier would never open otherwise), and its tiles cover [B, H]."""
    require("triton")
    from mmrnn_ext import kernels
    from mmrnn_ext.kernels import launch

    cuda = torch.device("cuda")
    monkeypatch.setattr(launch, "_resident_programs", lambda device: 132 if device.type == "cuda" else 1)
    for B, H in [(1, 256), (16, 128), (64, 256), (64, 512), (256, 1024), (1000, 4096), (3, 80)]:
        for dtype in (torch.float32, torch.bfloat16):
            cfg = kernels.default_config(B, H, dtype, cuda, "cooperative")
            tiles = -(-B // cfg.block_b) * -(-H // cfg.block_n)
            (programs,) = launch._grid(cfg, B, H, cuda, "cooperative")
            assert 1 <= programs <= min(132, tiles), (B, H, cfg, programs)
            assert cfg.block_b >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16
            if cfg.block_n < min(128, triton_next_pow2(H)):
                assert tiles <= 132, (B, H, cfg)  # widened only as far as needed
            assert cfg.block_n <= max(16, triton_next_pow2(H))
    assert launch._grid(kernels.default_config(256, 1024, torch.float32, torch.device("cpu"), "cooperative"),
                     256, 1024, torch.device("cpu"), "cooperative") == (1,)


@needs_interpreter
@pytest.mark.parametrize("block_b,block_n", [(16, 16), (16, 32), (32, 16)])
def test_interpreted_cooperative_tile_loop(block_b, block_n):
    """One program walks every [block_b, block_n] tile of every step (several batch and hidden tiles,
    ragged edges), forward and backward."""
    require("triton")
    from mmrnn_ext import kernels

    cfg = kernels.Config(block_b, block_n, 16)
    xp, w, h0, img, lens = [None if a is None else a.detach() for a in make_inputs(3, 37, 50, "step", torch.float32,
                                                                                   lengths=True, seed=3)]
    from mmrnn_ext.reference import reference_backward, reference_forward

    out = kernels.rnn_forward(xp, w, h0, img, lens, "tanh", form="cooperative", config=cfg)
    ref = reference_forward(xp, w, h0, img, lens, "tanh")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    gy, ghl = torch.randn_like(out), torch.randn_like(h0)
    dA, dh0 = kernels.rnn_backward(gy, ghl, out, h0, w, lens, "tanh", form="cooperative", config=cfg)
    r_dA, r_dh0 = reference_backward(gy, ghl, out, h0, w, lens, "tanh")
    torch.testing.assert_close(dA, r_dA, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dh0, r_dh0, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_interpreted_module_matches_torch(bidirectional):
    require("triton")
    torch.manual_seed(0)
    ref = torch.nn.RNN(5, 16, num_layers=2, bidirectional=bidirectional)
    ours = mmrnn_ext.RNN(5, 16, num_layers=2, bidirectional=bidirectional, backend="triton")
    ours.load_state_dict(ref.state_dict())
    lens = torch.tensor([3, 1, 2])
    x = torch.randn(3, 3, 5)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, enforce_sorted=False)
    out_r, h_r = ref(packed)
    out_o, h_o = ours(packed)
    torch.testing.assert_close(out_o.data, out_r.data, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_o, h_r, atol=1e-5, rtol=1e-5)
    (out_r.data.sum() + h_r.sum()).backward()
    (out_o.data.sum() + h_o.sum()).backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


# --- compiled kernels on a GPU ----------------------------------------------------------------

GPU_SHAPES = [(7, 3, 48), (33, 17, 128), (9, 65, 256), (5, 3, 512), (40, 130, 1024)]
GPU_INPUTS = [("static", False), ("step", True)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("T,B,H", GPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in GPU_SHAPES])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("image,lengths", GPU_INPUTS, ids=["static-full", "step-lengths"])
def test_gpu_kernels_match_fp64_reference(form, T, B, H, precision, image, lengths, monkeypatch):
    """Forward and every gradient against float64. The cooperative form runs many programs here
    (up to 130 at hidden 1024), so its grid barrier is exercised; the step form is skipped past
    hidden 512 (one launch per step: slow, and the same tile code as the cooperative form)."""
    from mmrnn_ext import kernels

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if form == "persistent" and not kernels.persistent_fits(H, dtype):
        pytest.skip(f"hidden {H} does not fit the persistent form in {dtype}")
    if form == "step" and H > 512:
        pytest.skip("the step form is covered up to hidden 512")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    assert kernels.allow_tf32(dtype) == (precision == "tf32")
    tol = {"fp32": 1e-5, "tf32": 5e-4, "bf16": 1e-2, "fp16": 1e-2}[precision]
    compare_with_reference("triton", T, B, H, image, dtype, "tanh", lengths, device="cuda",
                           tol=_relative_check(tol), ref_dtype=torch.float64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, indirect=True)
def test_gpu_relu(form, monkeypatch):
    """relu in float32 (TF32 off), forward and every gradient at 1e-5. (In bfloat16 the rounding of h
    moves entries across 0, where relu' jumps, so a float64 gradient differs by whole entries: the
    16-bit dot path is checked with tanh above, and bfloat16 relu forward below.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare_with_reference("triton", 9, 33, 128, "static", torch.float32, "relu", True, device="cuda",
                           tol=_relative_check(1e-5), ref_dtype=torch.float64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, indirect=True)
def test_gpu_relu_bf16_forward(form):
    from mmrnn_ext import kernels
    from mmrnn_ext.reference import reference_forward

    xp, w, h0, img, lens = [None if a is None else a.detach() for a in
                            make_inputs(9, 33, 256, "step", torch.bfloat16, "cuda", lengths=True)]
    lens = lens.cuda()
    out = kernels.rnn_forward(xp, w, h0, img, lens, "relu")
    ref = reference_forward(xp.double(), w.double(), h0.double(), img.double(), lens, "relu")
    _relative_check(1e-2)(out, ref, torch.bfloat16, "out")


@gpu
@pytest.mark.gpu
def test_gpu_cooperative_repeatable():
    """The same inputs give bit-identical results on every run (a race would move them)."""
    require("triton")
    from mmrnn_ext import kernels

    args = [None if a is None else a.detach() for a in make_inputs(64, 96, 512, "static", torch.bfloat16, "cuda")]
    first = kernels.rnn_forward(*args, "tanh", form="cooperative")
    gy = torch.randn_like(first)
    d_first = kernels.rnn_backward(gy, args[2], first, args[2], args[1], None, "tanh", form="cooperative")
    for _ in range(20):
        assert torch.equal(kernels.rnn_forward(*args, "tanh", form="cooperative"), first)
        d = kernels.rnn_backward(gy, args[2], first, args[2], args[1], None, "tanh", form="cooperative")
        assert torch.equal(d[0], d_first[0]) and torch.equal(d[1], d_first[1])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_gpu_forward_captures_in_cuda_graph(form):
    require("triton")
    from mmrnn_ext import kernels

    args = [None if a is None else a.detach() for a in make_inputs(16, 8, 256, "static", torch.bfloat16, "cuda")]
    eager = kernels.rnn_forward(*args, "tanh", form=form)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.rnn_forward(*args, "tanh", form=form)  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = kernels.rnn_forward(*args, "tanh", form=form)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)


@needs_interpreter
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_gpu_sweep_script_runs_through_the_interpreter(tmp_path, cell):
    """bench/gpu_sweep.py (the device run's kernel sweep) on a tiny shape, for each cell: every variant
    it tries agrees with the float64 reference, and its JSON names form, tiles, times and step costs."""
    require("triton")
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_sweep.py")
    spec = importlib.util.spec_from_file_location("gpu_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep.json"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        assert sweep.main([str(out), "--device", "cpu", "--shape", "3,2,0,0,20", "--dtype", "bfloat16,float32-notf32",
                           "--cell", cell]) == 0
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = json.loads(out.read_text())["rows"]
    assert {r["form"] for r in rows} == {"persistent", "cooperative"}
    assert all(r["ok"] and r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["cell"] == cell for r in rows)
    assert sum(r["auto"] for r in rows if r["dtype"] == "bfloat16") == 1
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    assert all(r["step_flop"] == 2 * 3 * 20 * gates * 20 for r in rows)  # [B, H] x [H, G*H]
    # the errors cover every output and gradient of the cell: RNN 1 + 2, LSTM 3 + 3, GRU 2 + 3
    assert len(rows[0]["relative_errors"]) == {"rnn": 3, "lstm": 6, "gru": 5}[cell]


@needs_interpreter
def test_tf32_rounding_host_and_kernel_agree():
    """W_hh is rounded on the host, h in the kernel: both must give the same TF32 value — the nearest
    (ties away from zero), within 2^-11 relative — and keep NaN and infinities."""
    require("triton")
    import triton
    import triton.language as tl
    from mmrnn_ext.kernels import common, launch

    globals()["_round_tf32"] = common._round_tf32  # a jit function resolves names in its module's globals

    @triton.jit
    def round_kernel(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, _round_tf32(tl.load(x_ptr + r)))  # noqa: F821

    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, generator=g) * torch.logspace(-30, 30, 256)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1 + 2 ** -11, -(1 + 2 ** -11)])
    host = launch.round_tf32(x)
    dev = torch.empty_like(x)
    round_kernel[(1,)](x, dev, N=256)
    assert torch.equal(host.isnan(), x.isnan()) and torch.equal(dev.isnan(), x.isnan())
    finite = x.isfinite()
    assert torch.equal(host[~x.isnan()], dev[~x.isnan()])
    assert host[1] == float("inf") and host[2] == -float("inf")
    assert host[4] == 1 + 2 ** -10 and host[5] == -(1 + 2 ** -10)  # a tie rounds away from zero
    rel = ((host[finite] - x[finite]).abs() / x[finite].abs().clamp_min(1e-38))
    assert rel.max() <= 2 ** -11
    mantissa_low = host[finite].view(torch.int32) & 0x1FFF
    assert (mantissa_low == 0).all()  # exactly representable in TF32
