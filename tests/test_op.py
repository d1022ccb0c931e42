"""The fused op through each CPU backend against the reference, forward and every gradient."""
import pytest
import torch

import mmrnn_ext
from mmrnn_ext import InputError, rnn_recurrence
from mmrnn_ext.reference import rnn_recurrence_ref
from op_cases import compare_with_reference, make_inputs

SIZES = [(1, 1, 1), (5, 3, 7), (4, 1, 65), (33, 3, 7), (7, 17, 16)]


@pytest.mark.parametrize("T,B,H", SIZES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in SIZES])
@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_backend_matches_reference(cpu_backend, T, B, H, image, nonlinearity, lengths, dtype):
    compare_with_reference(cpu_backend, T, B, H, image, dtype, nonlinearity, lengths)


@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
def test_noncontiguous_inputs(cpu_backend, image):
    compare_with_reference(cpu_backend, 6, 3, 7, image, torch.float64, lengths=True, noncontig=True)


@pytest.mark.parametrize("image", [None, "static", "step"], ids=["noimg", "static", "step"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_gradcheck(cpu_backend, image, nonlinearity, lengths):
    xp, w, h0, img, lens = make_inputs(5, 3, 7, image, torch.float64, lengths=lengths, seed=3)
    if nonlinearity == "relu":  # keep pre-activations away from relu's kink, where finite differences lie
        with torch.no_grad():
            xp += 0.3 * torch.sign(xp)
    inputs = [t for t in (xp, w, h0, img) if t is not None]

    def fn(*ins):
        it = iter(ins)
        a, b, c = next(it), next(it), next(it)
        d = next(it) if img is not None else None
        return rnn_recurrence(a, b, c, d, lens, nonlinearity, backend=cpu_backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lengths_semantics(cpu_backend):
    """Past its length a row's output is zero and h_last is its state at its last step."""
    xp, w, h0, img, _ = make_inputs(6, 3, 5, "step", torch.float64)
    lens = torch.tensor([6, 0, 2])
    out, h_last = rnn_recurrence(xp, w, h0, img, lens, backend=cpu_backend)
    full, _ = rnn_recurrence_ref(xp, w, h0, img)
    assert torch.equal(out[2:, 2], torch.zeros_like(out[2:, 2]))
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    torch.testing.assert_close(h_last[1], h0[1], atol=0, rtol=0)
    torch.testing.assert_close(h_last[2], full[1, 2], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_last[0], full[5, 0], atol=1e-12, rtol=1e-12)


def test_only_needed_gradients(cpu_backend):
    xp, w, h0, img, _ = make_inputs(4, 3, 5, "static", torch.float64)
    h0.requires_grad_(False)
    out, h_last = rnn_recurrence(xp, w, h0, img, backend=cpu_backend)
    gx, = torch.autograd.grad(out.sum(), [xp])
    ref_out, _ = rnn_recurrence_ref(xp, w, h0, img)
    rx, = torch.autograd.grad(ref_out.sum(), [xp])
    torch.testing.assert_close(gx, rx, atol=1e-10, rtol=1e-10)


def test_backward_saves_no_projected_input(cpu_backend):
    """Only out, W_hh, h0 (and lengths) are kept for backward: not xp, nor the image term."""
    xp, w, h0, img, _ = make_inputs(4, 3, 5, "step", torch.float64)
    out, _ = rnn_recurrence(xp, w, h0, img, backend=cpu_backend)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 4 and saved[3] is None
    assert not any(s is not None and s.data_ptr() in (xp.data_ptr(), img.data_ptr()) for s in saved)


def test_backends_report():
    status = mmrnn_ext.backends()
    assert set(status) == {"cpp", "triton", "reference"}
    for name, entry in status.items():
        assert isinstance(entry["available"], bool) and entry["detail"], name
    assert status["reference"]["available"]


def test_unknown_backend_is_rejected():
    xp, w, h0, _, _ = make_inputs(2, 2, 3, None, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        rnn_recurrence(xp, w, h0, backend="cuda-magic")


def test_cpp_rejects_float16_but_auto_serves_it():
    if not mmrnn_ext.backends()["cpp"]["available"]:
        pytest.skip("cpp backend not built")
    xp, w, h0, _, _ = make_inputs(3, 2, 5, None, torch.float16)
    with pytest.raises(TypeError, match="float32"):
        rnn_recurrence(xp, w, h0, backend="cpp")
    out, _ = rnn_recurrence(xp, w, h0)  # auto -> reference, computed in float32
    ref, _ = rnn_recurrence_ref(xp.double(), w.double(), h0.double())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_auto_serves_bfloat16_on_cpp():
    if not mmrnn_ext.backends()["cpp"]["available"]:
        pytest.skip("cpp backend not built")
    xp, w, h0, _, _ = make_inputs(3, 2, 5, None, torch.bfloat16)
    assert mmrnn_ext.backend_for(xp) == "cpp"
    out, _ = rnn_recurrence(xp, w, h0)  # auto -> cpp: bf16 operands, float32 accumulation
    ref, _ = rnn_recurrence_ref(xp.double(), w.double(), h0.double())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", ["xp_rank", "w_shape", "h0_shape", "img_shape", "dtype", "lengths_len",
                                  "lengths_range", "lengths_float", "nonlinearity"])
def test_op_bad_input(case):
    xp, w, h0, img, _ = make_inputs(4, 3, 5, "static", torch.float32)
    kwargs = dict(xp=xp, w_hh=w, h0=h0, image_term=img, lengths=None, nonlinearity="tanh")
    bad, match = {
        "xp_rank": (dict(xp=xp[0]), "xp"),
        "w_shape": (dict(w_hh=w[:, :4]), "w_hh"),
        "h0_shape": (dict(h0=h0[:2]), "h0"),
        "img_shape": (dict(image_term=img[:, :4]), "image_term"),
        "dtype": (dict(h0=h0.double()), "h0.*float32"),
        "lengths_len": (dict(lengths=torch.tensor([1, 2])), "lengths"),
        "lengths_range": (dict(lengths=torch.tensor([1, 5, 2])), r"lengths.*\[0, 4\]"),
        "lengths_float": (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths.*integer"),
        "nonlinearity": (dict(nonlinearity="gelu"), "nonlinearity"),
    }[case]
    kwargs.update(bad)
    with pytest.raises(InputError, match=match):
        rnn_recurrence(**kwargs)
