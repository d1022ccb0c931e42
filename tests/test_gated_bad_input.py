"""LSTM / GRU and their cells and ops reject bad input with the RNN's clarity, before any kernel
runs; where torch raises for an input, they raise too."""
import pytest
import torch
from torch import nn

import mmrnn_ext
from mmrnn_ext import InputError, gru_recurrence, lstm_recurrence

I, H, V, T, B, P = 5, 7, 3, 4, 2, 3


def _x():
    return torch.randn(T, B, I)


MODULE_CASES = {
    # name: (cell, ctor kwargs, forward args, forward kwargs, message) — torch raises for each as well
    "lstm_hx_tensor": ("lstm", {}, (_x(), torch.randn(1, B, H)), {}, "hx: LSTM expects a tuple"),
    "lstm_hx_one": ("lstm", {}, (_x(), (torch.randn(1, B, H),)), {}, "hx: LSTM expects a tuple.*of 1"),
    "lstm_hx_three": ("lstm", {}, (_x(), (torch.randn(1, B, H),) * 3), {}, "hx: LSTM expects a tuple.*of 3"),
    "lstm_h0_shape": ("lstm", {}, (_x(), (torch.randn(1, B + 1, H), torch.randn(1, B, H))), {},
                      r"hx\[0\] \(h_0\): Expected hidden\[0\] size \(1, 2, 7\)"),
    "lstm_c0_shape": ("lstm", {}, (_x(), (torch.randn(1, B, H), torch.randn(1, B, H + 1))), {},
                      r"hx\[1\] \(c_0\): Expected hidden\[1\] size \(1, 2, 7\)"),
    "lstm_proj_h0_is_P": ("lstm", {"proj_size": P}, (_x(), (torch.randn(1, B, H), torch.randn(1, B, H))), {},
                          r"hx\[0\] \(h_0\): Expected hidden\[0\] size \(1, 2, 3\)"),
    "lstm_proj_c0_is_H": ("lstm", {"proj_size": P}, (_x(), (torch.randn(1, B, P), torch.randn(1, B, P))), {},
                          r"hx\[1\] \(c_0\): Expected hidden\[1\] size \(1, 2, 7\)"),
    "lstm_hx_rank": ("lstm", {}, (_x(), (torch.randn(B, H), torch.randn(B, H))), {}, "batched 3-D input"),
    "lstm_c0_dtype": ("lstm", {}, (_x(), (torch.randn(1, B, H), torch.randn(1, B, H, dtype=torch.float64))), {},
                      r"hx\[1\] \(c_0\): expected dtype"),
    "gru_hx_tuple": ("gru", {}, (_x(), (torch.randn(1, B, H),)), {}, "hx: expected a tensor, got tuple"),
    "gru_hx_shape": ("gru", {}, (_x(), torch.randn(1, B, H + 1)), {}, r"hx: Expected hidden size \(1, 2, 7\)"),
    "input_rank": ("gru", {}, (torch.randn(T, B, I, 1),), {}, "input: GRU: Expected input to be 2D or 3D"),
    "feature_size": ("lstm", {}, (torch.randn(T, B, I + 1),), {}, "input.*Expected 5, got 6"),
    "input_dtype": ("lstm", {}, (torch.randn(T, B, I, dtype=torch.float64),), {}, "input: LSTM input dtype"),
    "zero_length": ("gru", {}, (torch.randn(0, B, I),), {}, "at least one step"),
}


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_raises_where_torch_raises(case, gemm_calls):
    cell, ctor, args, kwargs, match = MODULE_CASES[case]
    ref = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](I, H, **ctor)
    ours = {"lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell](I, H, **ctor)
    with pytest.raises(Exception):
        ref(*args, **kwargs)
    called = gemm_calls
    with pytest.raises(InputError, match=match):
        ours(*args, **kwargs)
    assert not called, "a GEMM ran before the error"


IMAGE_CASES = {
    "image_without_image_size": (dict(image_size=None), dict(image=torch.randn(B, V)), "image.*without image_size"),
    "image_feature_size": (dict(), dict(image=torch.randn(B, V + 1)), r"image: expected shape \(2, 3\) \(static\) or \(4, 2, 3\)"),
    "image_length": (dict(), dict(image=torch.randn(T + 1, B, V)), "image: expected shape"),
    "image_dtype": (dict(), dict(image=torch.randn(B, V, dtype=torch.float64)), "image: expected dtype torch.float32"),
    "lengths_batch": (dict(), dict(lengths=torch.tensor([1, 2, 3])), "lengths: expected a 1-D integer tensor of 2"),
    "lengths_range": (dict(), dict(lengths=torch.tensor([1, T + 1])), r"lengths: expected values in \[0, 4\]"),
    "lengths_float": (dict(), dict(lengths=torch.tensor([1.0, 2.0])), "lengths: expected an integer tensor"),
}


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_and_lengths_errors(cell, case, gemm_calls):
    ctor, kwargs, match = IMAGE_CASES[case]
    m = {"lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell](I, H, image_size=ctor.get("image_size", V))
    called = gemm_calls
    with pytest.raises(InputError, match=match):
        m(_x(), **kwargs)
    assert not called, "a GEMM ran before the error"


CELL_CASES = {
    "lstmcell_hx_tensor": ("lstm", (torch.randn(B, I), torch.randn(B, H)), "hx: LSTMCell expects a tuple", TypeError),
    "lstmcell_c_batch": ("lstm", (torch.randn(B, I), (torch.randn(B, H), torch.randn(B + 1, H))),
                         r"hx\[1\] \(c_0\): expected shape", RuntimeError),
    "grucell_tuple": ("gru", (torch.randn(B, I), (torch.randn(B, H),)), "hx: expected a tensor, got tuple", Exception),
    "grucell_batch": ("gru", (torch.randn(B, I), torch.randn(B + 1, H)), "hx: expected shape", RuntimeError),
    "cell_input_rank": ("gru", (torch.randn(T, B, I),), "input: GRUCell: Expected input to be 1D or 2D", ValueError),
    "cell_feature_size": ("lstm", (torch.randn(B, I + 1),), "input.*input_size", RuntimeError),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_raises_where_torch_raises(case):
    cell, args, match, torch_type = CELL_CASES[case]
    ref = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[cell](I, H)
    ours = {"lstm": mmrnn_ext.LSTMCell, "gru": mmrnn_ext.GRUCell}[cell](I, H)
    with pytest.raises(torch_type):
        ref(*args)
    with pytest.raises(torch_type, match=match):  # catchable as the type torch raises ...
        ours(*args)
    with pytest.raises(InputError):  # ... and as ours
        ours(*args)


def test_constructor_errors():
    with pytest.raises(ValueError, match="proj_size has to be smaller"):
        mmrnn_ext.LSTM(I, H, proj_size=H)
    with pytest.raises(ValueError, match="proj_size should be"):
        mmrnn_ext.LSTM(I, H, proj_size=-1)
    with pytest.raises(ValueError, match="image_size"):
        mmrnn_ext.GRU(I, H, image_size=0)
    with pytest.raises(ValueError, match="backend"):
        mmrnn_ext.LSTMCell(I, H, backend="fast")
    with pytest.raises(TypeError):
        mmrnn_ext.GRU(I, H, nonlinearity="relu")  # nn.GRU takes no nonlinearity either


def _lstm_args(dtype=torch.float32):
    return dict(xp=torch.randn(T, B, 4 * H, dtype=dtype), w_hh=torch.randn(4 * H, H, dtype=dtype),
                h0=torch.zeros(B, H, dtype=dtype), c0=torch.zeros(B, H, dtype=dtype),
                image_term=torch.randn(B, 4 * H, dtype=dtype), lengths=None)


def _gru_args(dtype=torch.float32):
    return dict(xp=torch.randn(T, B, 3 * H, dtype=dtype), w_hh=torch.randn(3 * H, H, dtype=dtype),
                b_hn=torch.zeros(H, dtype=dtype), h0=torch.zeros(B, H, dtype=dtype),
                image_term=torch.randn(B, 3 * H, dtype=dtype), lengths=None)


OP_CASES = {
    "lstm_xp_width": ("lstm", dict(xp=torch.randn(T, B, 4 * H + 1)), "xp: expected a last dimension of 4"),
    "lstm_w_shape": ("lstm", dict(w_hh=torch.randn(3 * H, H)), r"w_hh: expected shape \(28, 7\)"),
    "lstm_c0_shape": ("lstm", dict(c0=torch.zeros(B, H + 1)), r"c0: expected shape \(2, 7\)"),
    "lstm_img_width": ("lstm", dict(image_term=torch.randn(B, H)), r"image_term: expected shape \(2, 28\)"),
    "lstm_c0_dtype": ("lstm", dict(c0=torch.zeros(B, H, dtype=torch.float64)), "c0: expected dtype torch.float32"),
    "lstm_lengths": ("lstm", dict(lengths=torch.tensor([1, 9])), r"lengths: expected values in \[0, 4\]"),
    "gru_xp_width": ("gru", dict(xp=torch.randn(T, B, 3 * H + 2)), "xp: expected a last dimension of 3"),
    "gru_w_shape": ("gru", dict(w_hh=torch.randn(4 * H, H)), r"w_hh: expected shape \(21, 7\)"),
    "gru_b_hn_shape": ("gru", dict(b_hn=torch.zeros(3 * H)), r"b_hn: expected shape \(7,\)"),
    "gru_img_step": ("gru", dict(image_term=torch.randn(T + 1, B, 3 * H)), "image_term: expected shape"),
    "gru_lengths_rank": ("gru", dict(lengths=torch.tensor([[1, 2]])), "lengths: expected a 1-D integer tensor"),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_bad_input(case):
    cell, bad, match = OP_CASES[case]
    kwargs = _lstm_args() if cell == "lstm" else _gru_args()
    kwargs.update(bad)
    with pytest.raises(InputError, match=match):
        (lstm_recurrence if cell == "lstm" else gru_recurrence)(**kwargs)


def test_backends_say_which_cells_auto_gives_triton():
    """Every cell runs on the Triton kernels, by request and by "auto" on CUDA; backends() says so per
    cell, names what is verified where, and where an LSTM with proj_size > 0 runs."""
    status = mmrnn_ext.backends()
    for name in ("triton", "cpp", "reference"):
        assert set(status[name]["cells"]) == set(status[name]["auto_cells"]) == {"rnn", "lstm", "gru"}
    assert "proj_size" in status["triton"]["detail"] or not status["triton"]["available"]
    if status["triton"]["available"] and torch.cuda.is_available():
        x = torch.randn(2, 3, I, device="cuda")
        assert mmrnn_ext.backend_for(x, "auto", "lstm") == mmrnn_ext.backend_for(x, "auto", "gru") == "triton"
