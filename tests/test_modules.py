"""mmrnn_ext.RNN as a drop-in for torch.nn.RNN: the full grid with its nonlinearity, state dict and
repr (image conditioning, cells, odd sizes and the rest, for every cell: test_cells.py)."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import mmrnn_ext
from conftest import assert_close

I, H, V = 5, 7, 3
LENGTHS = [4, 6, 1, 6]  # unsorted, with ties


def _twins(cpu_backend, dtype=torch.float64, image_size=None, **kw):
    torch.manual_seed(0)
    ref = nn.RNN(I + (image_size or 0), H, dtype=dtype, **kw)
    ours = mmrnn_ext.RNN(I, H, dtype=dtype, image_size=image_size, backend=cpu_backend, **kw)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("weight_img"):
                continue
            src = getattr(ref, name)
            if image_size and name.startswith("weight_ih_l0"):
                p.copy_(src[:, :I])  # the concatenated model's input columns ...
                getattr(ours, name.replace("weight_ih", "weight_img")).copy_(src[:, I:])  # ... and its image columns
            else:
                p.copy_(src)
    return ref, ours


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _run(module, x, hx, **kw):
    module.zero_grad()
    out, h_n = module(x, hx, **kw)
    data = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(7)
    loss = (data * torch.randn(data.shape, generator=g, dtype=data.dtype)).sum() + \
        (h_n * torch.randn(h_n.shape, generator=g, dtype=h_n.dtype)).sum()
    loss.backward()
    return out, h_n


GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True], ["tanh", "relu"],
                              ["batched", "unbatched", "packed"], [False, True]))


def _grid_id(c):
    L, bi, bf, bias, nl, mode, hx = c
    return f"L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'bias' if bias else 'nobias'}-{nl}-{mode}-{'hx' if hx else 'nohx'}"


@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_rnn_matches_torch(cpu_backend, case):
    num_layers, bidirectional, batch_first, bias, nonlinearity, mode, give_hx = case
    dtype = torch.float64
    ref, ours = _twins(cpu_backend, dtype, num_layers=num_layers, bidirectional=bidirectional,
                       batch_first=batch_first, bias=bias, nonlinearity=nonlinearity)
    D = 2 if bidirectional else 1
    B, T = len(LENGTHS), max(LENGTHS)
    g = torch.Generator().manual_seed(1)
    shape = (B, T, I) if batch_first else (T, B, I)
    if mode == "unbatched":
        shape = (T, I)
    x = torch.randn(shape, generator=g, dtype=dtype)
    hx_shape = (num_layers * D, H) if mode == "unbatched" else (num_layers * D, B, H)
    hx = torch.randn(hx_shape, generator=g, dtype=dtype) if give_hx else None
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hxs = [None, None] if hx is None else [hx.clone().requires_grad_() for _ in range(2)]
    if mode == "packed":
        ins = [pack_padded_sequence(xi, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False) for xi in xs]
    else:
        ins = xs
    out_r, h_r = _run(ref, ins[0], hxs[0])
    out_o, h_o = _run(ours, ins[1], hxs[1])
    if mode == "packed":
        assert isinstance(out_o, PackedSequence)
        assert torch.equal(out_o.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_o.sorted_indices, out_r.sorted_indices)
        out_r, out_o = out_r.data, out_o.data
    assert out_o.shape == out_r.shape and h_o.shape == h_r.shape
    assert_close(out_o, out_r, dtype, "output")
    assert_close(h_o, h_r, dtype, "h_n")
    gr, go = _grads(ref), _grads(ours)
    for name in gr:
        assert_close(go[name], gr[name], dtype, f"grad {name}")
    assert_close(xs[1].grad, xs[0].grad, dtype, "grad input")
    if give_hx:
        assert_close(hxs[1].grad, hxs[0].grad, dtype, "grad hx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_rnn_matches_torch_fp32_sample(cpu_backend, dtype, bidirectional):
    ref, ours = _twins(cpu_backend, dtype, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(9, 3, I, dtype=dtype)
    out_r, h_r = _run(ref, x, None)
    out_o, h_o = _run(ours, x, None)
    assert_close(out_o, out_r, dtype, "output")
    assert_close(h_o, h_r, dtype, "h_n")
    for name, g in _grads(ref).items():
        assert_close(_grads(ours)[name], g, dtype, f"grad {name}")


def test_state_dict_and_init_match_torch():
    torch.manual_seed(9)
    ref = nn.RNN(I, H, num_layers=2, bidirectional=True, bias=False)
    torch.manual_seed(9)
    ours = mmrnn_ext.RNN(I, H, num_layers=2, bidirectional=True, bias=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # same names, shapes and initial values
    ours.load_state_dict(ref.state_dict(), strict=True)
    img = mmrnn_ext.RNN(I, H, num_layers=2, bidirectional=True, image_size=V)
    assert img.weight_img_l1_reverse.shape == (H, V)
    stdv = 1 / H ** 0.5
    assert img.weight_img_l0.abs().max() <= stdv and img.weight_img_l0.std() > 0


def test_repr_and_flatten_parameters():
    m = mmrnn_ext.RNN(I, H, 2, nonlinearity="relu", batch_first=True, bidirectional=True, image_size=V)
    assert repr(m) == f"RNN({I}, {H}, num_layers=2, nonlinearity=relu, batch_first=True, bidirectional=True, image_size={V})"
    assert repr(mmrnn_ext.RNN(I, H)) == repr(nn.RNN(I, H))
    assert repr(mmrnn_ext.RNNCell(I, H)) == repr(nn.RNNCell(I, H))
    m.flatten_parameters()
    assert len(m.all_weights) == 4 and len(m.all_weights[0]) == 5
