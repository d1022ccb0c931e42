"""The LSTM and GRU Triton kernels (step, cooperative and persistent forms, forward and every gradient) against
the plain-PyTorch definitions. Without CUDA they run on CPU tensors through Triton's interpreter
(conftest sets TRITON_INTERPRET=1), which is how CI checks them; `gpu` tests run the compiled kernels."""
import itertools
import os

import pytest
import torch

from conftest import require
from test_gated_ops import compare, make_inputs, outputs_and_grads, run_op, run_ref
from test_triton import _relative_check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="interpreter twin of the GPU tests: needs TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FORMS = ["step", "cooperative", "persistent"]
CELLS = ["lstm", "gru"]
SIZES = list(itertools.product([1, 3, 17], [1, 4], [16, 48, 80, 7]))


@pytest.fixture
def form(request, monkeypatch):
    require("triton")
    monkeypatch.setenv("MMRNN_TRITON_FORM", request.param)
    return request.param


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B,T,H", SIZES, ids=[f"B{b}-T{t}-H{h}" for b, t, h in SIZES])
def test_interpreted_sizes(form, cell, B, T, H):
    compare(cell, "triton", T, B, H, "step", torch.float32, lengths=True)


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_interpreted_image_and_lengths(form, cell, image, lengths):
    compare(cell, "triton", 4, 3, 20, image, torch.float32, lengths=lengths)


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_interpreted_noncontiguous(form, cell):
    compare(cell, "triton", 4, 3, 16, "step", torch.float32, lengths=True, noncontig=True)


def against_fp64(cell, T, B, H, image, dtype, rel_tol, device="cpu"):
    """Forward and every gradient of the Triton op on `dtype` inputs vs the definition evaluated in
    float64 on the same (rounded) inputs: norm-wise relative error <= rel_tol."""
    args, lens = make_inputs(cell, T, B, H, image, dtype, lengths=True)
    args = [None if a is None else a.detach().to(device).requires_grad_() for a in args]
    lens = lens.to(device)
    outs, grads = outputs_and_grads(lambda a: run_op(cell, "triton", a, lens), args)
    wide = [None if a is None else a.detach().double().requires_grad_() for a in args]
    r_outs, r_grads = outputs_and_grads(lambda a: run_ref(cell, a, lens), wide)
    check = _relative_check(rel_tol)
    for k, (got, want) in enumerate(zip(outs + grads, r_outs + r_grads)):
        assert got.dtype == dtype
        check(got, want, dtype, f"{cell} {'output' if k < len(outs) else 'gradient'} {k}")


@needs_interpreter
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreted_low_precision(form, cell, dtype):
    """16-bit inputs, float32 accumulation and carries: within 1e-2 of float64."""
    against_fp64(cell, 4, 17, 48, "static", dtype, 1e-2)


def test_gated_forms_by_size():
    """auto: persistent wherever the gate blocks of W_hh fit on chip (gates x Hp^2 within the RNN's
    bound), cooperative beyond; an explicit form is honoured; an unknown one is refused by name."""
    require("triton")
    from mmrnn_ext import kernels

    for gates in (3, 4):
        assert kernels.choose_form(128, torch.bfloat16, "auto", gates) == "persistent"
        assert kernels.choose_form(129, torch.bfloat16, "auto", gates) == "cooperative"
        assert kernels.choose_form(64, torch.float32, "auto", gates) == "persistent"
        assert kernels.choose_form(65, torch.float32, "auto", gates) == "cooperative"
        assert kernels.choose_form(512, torch.float16, "step", gates) == "step"
    assert kernels.choose_form(256, torch.bfloat16, "auto", 1) == "persistent"  # the RNN's bound unchanged
    with pytest.raises(ValueError, match="form: expected one of"):
        kernels.choose_form(16, torch.float32, "fused", 4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS, indirect=True)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B,H", [(7, 3, 48), (8, 33, 64), (6, 20, 128), (9, 65, 256), (5, 3, 512)],
                         ids=["T7-B3-H48", "T8-B33-H64", "T6-B20-H128", "T9-B65-H256", "T5-B3-H512"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_gpu_gated_kernels_match_fp64(form, cell, T, B, H, precision, monkeypatch):
    """The compiled kernels, forward and every gradient, against float64 at the dtype's tolerance
    (the persistent form at the sizes it holds: its bound is hidden 64 in float32, 128 in 16-bit)."""
    from mmrnn_ext import kernels

    dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if form == "persistent" and not kernels.persistent_fits(H, dtype, 4 if cell == "lstm" else 3):
        pytest.skip(f"hidden {H} does not fit the {cell} persistent form in {dtype}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", precision == "tf32")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", precision == "tf32")
    against_fp64(cell, T, B, H, "step", dtype, {"fp32": 1e-5, "tf32": 5e-4, "bf16": 1e-2, "fp16": 1e-2}[precision],
                 device="cuda")


@needs_interpreter
@pytest.mark.parametrize("cell", CELLS)
def test_interpreted_module_matches_torch(cell):
    """mmrnn_ext.LSTM / GRU on the Triton kernels vs torch.nn.LSTM / GRU with the same weights:
    two layers, bidirectional, padded input with lengths; outputs, final states and every gradient."""
    require("triton")
    import mmrnn_ext

    torch.manual_seed(0)
    ours_cls, theirs_cls = (mmrnn_ext.LSTM, torch.nn.LSTM) if cell == "lstm" else (mmrnn_ext.GRU, torch.nn.GRU)
    ours = ours_cls(5, 16, num_layers=2, bidirectional=True, batch_first=True, backend="triton")
    theirs = theirs_cls(5, 16, num_layers=2, bidirectional=True, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 5, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])
    out, state = ours(x, lengths=lengths)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    ref_packed, ref_state = theirs(packed)
    ref_out, _ = torch.nn.utils.rnn.pad_packed_sequence(ref_packed, batch_first=True, total_length=4)
    states = state if cell == "lstm" else (state,)
    ref_states = ref_state if cell == "lstm" else (ref_state,)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(states, ref_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    loss = out.square().sum() + sum(s.sum() for s in states)
    ref_loss = ref_out.square().sum() + sum(s.sum() for s in ref_states)
    grads = torch.autograd.grad(loss, [x, *ours.parameters()])
    ref_grads = torch.autograd.grad(ref_loss, [x, *theirs.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _gpu_args(cell, T, B, H, dtype):
    args, lens = make_inputs(cell, T, B, H, "static", dtype, lengths=True)
    return [None if a is None else a.detach().cuda() for a in args], lens.cuda()


def _kernel_pass(cell, args, lens, form):
    """The kernels' forward and backward on one set of inputs (gradients of ones-like outputs)."""
    from mmrnn_ext import kernels

    if cell == "lstm":
        xp, w, h0, c0, img = args
        out, c_all, gates = kernels.lstm_forward(xp, w, h0, c0, img, lens, form=form)
        grads = kernels.lstm_backward(torch.ones_like(out), h0, c0, out, c_all, gates, h0, c0, w, lens, form=form)
        return (out, c_all, gates, *grads)
    xp, w, b_hn, h0, img = args
    out, gates = kernels.gru_forward(xp, w, b_hn, h0, img, lens, form=form)
    return (out, gates, *kernels.gru_backward(torch.ones_like(out), h0, out, gates, h0, w, lens, form=form))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_gated_cooperative_repeatable(cell):
    """The cooperative form with many programs (hidden 1024, batch 64): bit-identical results on every
    run, forward and backward (a race at the grid barrier would move them)."""
    require("triton")
    args, lens = _gpu_args(cell, 12, 64, 1024, torch.bfloat16)
    first = _kernel_pass(cell, args, lens, "cooperative")
    for _ in range(10):
        assert all(torch.equal(a, b) for a, b in zip(_kernel_pass(cell, args, lens, "cooperative"), first))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_gated_captures_in_cuda_graph(form, cell):
    """Forward and backward of every form, captured in one CUDA graph and replayed: the same bits as eager."""
    require("triton")
    args, lens = _gpu_args(cell, 8, 16, 128, torch.bfloat16)
    eager = _kernel_pass(cell, args, lens, form)
    _kernel_pass(cell, args, lens, form)  # compiled and warm before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _kernel_pass(cell, args, lens, form)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_gated_modules_auto_run_the_kernels(cell, dtype, monkeypatch):
    """backend='auto' on CUDA gives the gated cells the Triton kernels: a 2-layer bidirectional module
    with an image and lengths, outputs and every parameter's gradient against float64 on the CPU."""
    import mmrnn_ext

    I, H, V = 5, 48, 3
    cls = mmrnn_ext.LSTM if cell == "lstm" else mmrnn_ext.GRU
    torch.manual_seed(11)
    m = cls(I, H, num_layers=2, bidirectional=True, image_size=V, dtype=torch.float64)
    with torch.no_grad():  # the float64 twin holds the same (rounded) weights and inputs
        for p in m.parameters():
            p.copy_(p.to(dtype))
    g = cls(I, H, num_layers=2, bidirectional=True, image_size=V).to("cuda", dtype)
    g.load_state_dict({k: v.to(dtype) for k, v in m.state_dict().items()})
    x = torch.randn(6, 3, I, dtype=torch.float64).to(dtype).double()
    img = torch.randn(3, V, dtype=torch.float64).to(dtype).double()
    lens = torch.tensor([6, 2, 4])
    assert mmrnn_ext.backend_for(x.cuda().to(dtype), cell=cell) == "triton"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 at float32's tolerance
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    out_r, _ = m(x, image=img, lengths=lens)
    out_g, _ = g(x.cuda().to(dtype), image=img.cuda().to(dtype), lengths=lens)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out_g.double().cpu() - out_r).norm() / out_r.norm()).item() <= tol
    out_r.sum().backward()
    out_g.float().sum().backward()
    for (name, p), q in zip(m.named_parameters(), g.parameters()):
        rel = ((q.grad.double().cpu() - p.grad).norm() / p.grad.norm()).item()
        assert rel <= tol, (name, rel)
