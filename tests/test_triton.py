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


GRID = list(itertools.product([1, 3, 17], [1, 4], [16, 48, 80]))


@needs_interpreter
@pytest.mark.parametrize("form", ["step", "persistent"], indirect=True)
@pytest.mark.parametrize("B,T,H", GRID, ids=[f"B{b}-T{t}-H{h}" for b, t, h in GRID])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_interpreted_kernels_match_reference(form, B, T, H, image, nonlinearity, lengths):
    compare_with_reference("triton", T, B, H, image, torch.float32, nonlinearity, lengths)


@needs_interpreter
@pytest.mark.parametrize("form", ["step", "persistent"], indirect=True)
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
@pytest.mark.parametrize("form", ["step", "persistent"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreted_low_precision(form, dtype):
    compare_with_reference("triton", 4, 17, 48, "static", dtype, "tanh", lengths=True,
                           tol=_relative_check(1e-2), ref_dtype=torch.float64)


@needs_interpreter
def test_forms_agree_and_choice_by_size():
    require("triton")
    from mmrnn_ext import kernels

    assert kernels.choose_form(128, torch.float32) == "persistent"
    assert kernels.choose_form(256, torch.float32) == "step"
    assert kernels.choose_form(256, torch.bfloat16) == "persistent"
    assert kernels.choose_form(512, torch.bfloat16) == "step"
    assert kernels.choose_form(512, torch.bfloat16, "persistent") == "persistent"
    with pytest.raises(ValueError, match="form"):
        kernels.choose_form(64, torch.float32, "fastest")
    args = make_inputs(4, 3, 48, "step", torch.float32, lengths=True)
    outs = [kernels.rnn_forward(*[None if a is None else a.detach() for a in args], "tanh", form=f)
            for f in ("step", "persistent")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


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

GPU_SHAPES = [(7, 3, 48), (33, 17, 128), (9, 65, 256), (5, 3, 512)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", ["step", "persistent"], indirect=True)
@pytest.mark.parametrize("T,B,H", GPU_SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in GPU_SHAPES])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("image", ["static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_gpu_kernels_match_fp64_reference(form, T, B, H, precision, image, lengths, monkeypatch):
    from mmrnn_ext import kernels

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if form == "persistent" and not kernels.persistent_fits(H, dtype):
        pytest.skip(f"hidden {H} does not fit the persistent form in {dtype}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    assert kernels.allow_tf32(dtype) == (precision == "tf32")
    tol = {"fp32": 1e-5, "tf32": 5e-4, "bf16": 1e-2, "fp16": 1e-2}[precision]
    compare_with_reference("triton", T, B, H, image, dtype, "tanh", lengths, device="cuda",
                           tol=_relative_check(tol), ref_dtype=torch.float64)


@gpu
@pytest.mark.gpu
def test_gpu_step_form_captures_in_cuda_graph(monkeypatch):
    require("triton")
    from mmrnn_ext import kernels

    args = [None if a is None else a.detach() for a in make_inputs(16, 8, 256, "static", torch.bfloat16, "cuda")]
    eager = kernels.rnn_forward(*args, "tanh", form="step")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.rnn_forward(*args, "tanh", form="step")  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = kernels.rnn_forward(*args, "tanh", form="step")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, atol=0, rtol=0)
