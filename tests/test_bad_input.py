"""Every wrong call gets an error naming the argument, raised before any kernel runs; where
torch.nn.RNN raises for an input, mmrnn_ext.RNN raises too (catchable as the same exception type)."""
import pytest
import torch
from torch import nn

import mmrnn_ext
from mmrnn_ext import InputError

I, H, V, T, B = 5, 7, 3, 4, 2


def _pair():
    return nn.RNN(I, H), mmrnn_ext.RNN(I, H)


CASES = {
    # name: (args, kwargs, message fragment) — shared with nn.RNN
    "input_rank_4": ((torch.randn(T, B, I, 1),), {}, "input.*2D or 3D"),
    "input_rank_1": ((torch.randn(I),), {}, "input.*2D or 3D"),
    "feature_size": ((torch.randn(T, B, I + 1),), {}, "input.*input_size. Expected 5, got 6"),
    "hx_shape": ((torch.randn(T, B, I), torch.randn(1, B + 1, H)), {}, r"hx.*Expected hidden size \(1, 2, 7\)"),
    "hx_rank_batched": ((torch.randn(T, B, I), torch.randn(B, H)), {}, "hx.*batched 3-D input.*2-D"),
    "hx_rank_unbatched": ((torch.randn(T, I), torch.randn(1, 1, H)), {}, "hx.*unbatched 2-D input.*3-D"),
    "input_dtype": ((torch.randn(T, B, I, dtype=torch.float64),), {}, "input.*dtype"),
    "hx_dtype": ((torch.randn(T, B, I), torch.randn(1, B, H, dtype=torch.float64)), {}, "hx.*dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rnn_raises_where_torch_raises(case):
    args, kwargs, match = CASES[case]
    ref, ours = _pair()
    with pytest.raises((ValueError, RuntimeError)):
        ref(*args, **kwargs)
    with pytest.raises(InputError, match=match):
        ours(*args, **kwargs)


IMAGE_CASES = {
    "image_without_image_size": (dict(image_size=None), dict(image=torch.randn(B, V)), "image.*without image_size"),
    "image_feature_size": (dict(), dict(image=torch.randn(B, V + 1)), r"image: expected shape \(2, 3\) \(static\) or \(4, 2, 3\)"),
    "image_rank": (dict(), dict(image=torch.randn(1, T, B, V)), "image: expected shape"),
    "image_batch": (dict(), dict(image=torch.randn(B + 1, V)), "image: expected shape"),
    "image_length": (dict(), dict(image=torch.randn(T + 1, B, V)), "image: expected shape"),
    "image_dtype": (dict(), dict(image=torch.randn(B, V, dtype=torch.float64)), "image: expected dtype torch.float32"),
    "lengths_batch": (dict(), dict(lengths=torch.tensor([1, 2, 3])), "lengths: expected a 1-D integer tensor of 2"),
    "lengths_range": (dict(), dict(lengths=torch.tensor([1, T + 1])), r"lengths: expected values in \[0, 4\]"),
    "lengths_negative": (dict(), dict(lengths=torch.tensor([-1, 2])), r"lengths: expected values in \[0, 4\]"),
    "lengths_float": (dict(), dict(lengths=torch.tensor([1.0, 2.0])), "lengths: expected an integer tensor"),
}


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_and_lengths_errors(case, gemm_calls):
    ctor, kwargs, match = IMAGE_CASES[case]
    m = mmrnn_ext.RNN(I, H, image_size=ctor.get("image_size", V))
    called = gemm_calls
    with pytest.raises(InputError, match=match):
        m(torch.randn(T, B, I), **kwargs)
    assert not called, "a GEMM ran before the error"


def test_unbatched_image_shapes():
    m = mmrnn_ext.RNN(I, H, image_size=V)
    x = torch.randn(T, I)
    assert m(x, image=torch.randn(V))[0].shape == (T, H)
    assert m(x, image=torch.randn(T, V))[0].shape == (T, H)
    with pytest.raises(InputError, match=r"image: expected shape \(3,\) \(static\) or \(4, 3\)"):
        m(x, image=torch.randn(1, V))


def test_packed_rejects_lengths():
    m = mmrnn_ext.RNN(I, H)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(T, B, I), torch.tensor([T, 2]))
    with pytest.raises(InputError, match="lengths"):
        m(packed, lengths=torch.tensor([T, 2]))


def test_device_mismatch_is_named():
    m = mmrnn_ext.RNN(I, H, image_size=V).to("meta")
    with pytest.raises(InputError, match="input: expected device meta"):
        m(torch.randn(T, B, I))


CELL_CASES = {
    "input_rank": ((torch.randn(T, B, I),), {}, "input.*1D or 2D"),
    "feature_size": ((torch.randn(B, I + 1),), {}, "input.*input_size"),
    "hx_batch": ((torch.randn(B, I), torch.randn(B + 1, H)), {}, "hx: expected shape"),
    "input_dtype": ((torch.randn(B, I, dtype=torch.float64),), {}, "input: expected dtype"),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_raises_where_torch_raises(case):
    args, kwargs, match = CELL_CASES[case]
    ref, ours = nn.RNNCell(I, H), mmrnn_ext.RNNCell(I, H)
    with pytest.raises((ValueError, RuntimeError)):
        ref(*args, **kwargs)
    with pytest.raises(InputError, match=match):
        ours(*args, **kwargs)


def test_cell_image_errors():
    with pytest.raises(InputError, match="image.*without image_size"):
        mmrnn_ext.RNNCell(I, H)(torch.randn(B, I), image=torch.randn(B, V))
    with pytest.raises(InputError, match="image: expected shape"):
        mmrnn_ext.RNNCell(I, H, image_size=V)(torch.randn(B, I), image=torch.randn(B, V + 2))


def test_constructor_errors():
    with pytest.raises(ValueError, match="image_size"):
        mmrnn_ext.RNN(I, H, image_size=0)
    with pytest.raises(ValueError, match="backend"):
        mmrnn_ext.RNN(I, H, backend="fast")
    with pytest.raises(ValueError, match="nonlinearity"):
        mmrnn_ext.RNN(I, H, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout"):
        mmrnn_ext.RNN(I, H, dropout=1.5)


def test_unavailable_backend_names_the_fix(monkeypatch):
    from mmrnn_ext import _backends

    monkeypatch.setitem(_backends._cache, "cpp", (None, "the C++ extension mmrnn_ext._C is not built; build it with: pip install --no-build-isolation -e ."))
    m = mmrnn_ext.RNN(I, H, backend="cpp")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        m(torch.randn(T, B, I))
    out, _ = mmrnn_ext.RNN(I, H)(torch.randn(T, B, I))  # auto falls back to the reference
    assert out.shape == (T, B, H)
