"""bench/train_breakdown.py times a training step's parts alone; what it times must be what the
step computes: at odd sizes, each cell's weight-gradient part and image/bias part give the module's
own gradients after one step, and every part (comparison rows included) runs."""
import importlib.util
import os

import pytest
import torch

from conftest import assert_close, require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def breakdown():
    require("cpp")
    spec = importlib.util.spec_from_file_location("train_breakdown", os.path.join(ROOT, "bench", "train_breakdown.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 4, 9), (1, 3, 1, 1, 17)])
def test_parts_are_the_steps(breakdown, cell, shape):
    fns, flops, ours = breakdown.parts(cell, *shape)
    assert set(flops) <= set(fns)
    fns["step"]()
    d_w_ih, d_w_hh = fns["dW_ih and dW_hh"]()
    assert_close(d_w_ih, ours.weight_ih_l0.grad, torch.float32)
    assert_close(d_w_hh, ours.weight_hh_l0.grad, torch.float32)
    term, (d_w_img, d_b_ih, d_b_hh) = fns["image and bias"]()
    assert term.shape == (shape[0], ours.weight_ih_l0.shape[0])
    assert_close(d_w_img, ours.weight_img_l0.grad, torch.float32)
    assert_close(d_b_ih, ours.bias_ih_l0.grad, torch.float32)
    assert_close(d_b_hh, ours.bias_hh_l0.grad, torch.float32)  # the GRU's b_hn part included
    for name, fn in fns.items():
        if name != "step":
            fn()
