"""mmrnn_ext.RNN / RNNCell as drop-ins for torch.nn.RNN / RNNCell, and their image conditioning."""
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


@pytest.mark.parametrize("image_kind", ["static", "step"])
@pytest.mark.parametrize("mode", ["batched", "batch_first", "unbatched", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_image_equals_concatenated_input(cpu_backend, image_kind, mode, dtype):
    """RNN(image_size=V) == nn.RNN(I + V) on the input concatenated with the image, every gradient too."""
    batch_first = mode == "batch_first"
    ref, ours = _twins(cpu_backend, dtype, image_size=V, batch_first=batch_first)
    B, T = len(LENGTHS), max(LENGTHS)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    img = torch.randn((B, V) if image_kind == "static" else (T, B, V), generator=g, dtype=dtype)
    img_steps = img.expand(T, B, V) if image_kind == "static" else img
    xc = torch.cat([x, img_steps], dim=-1)
    if mode == "unbatched":
        x, xc, img = x[:, 0], xc[:, 0], img[0] if image_kind == "static" else img[:, 0]
    elif batch_first:
        x, xc = x.transpose(0, 1), xc.transpose(0, 1)
        img = img if image_kind == "static" else img.transpose(0, 1)
    img = img.clone().requires_grad_()
    xc = xc.detach().requires_grad_()
    x = x.clone().requires_grad_()
    if mode == "packed":
        lens = torch.tensor(LENGTHS)
        in_r = pack_padded_sequence(xc, lens, enforce_sorted=False)
        in_o = pack_padded_sequence(x, lens, enforce_sorted=False)
    else:
        in_r, in_o = xc, x
    out_r, h_r = _run(ref, in_r, None)
    out_o, h_o = _run(ours, in_o, None, image=img)
    if mode == "packed":
        out_r, out_o = out_r.data, out_o.data
    assert_close(out_o, out_r, dtype, "output")
    assert_close(h_o, h_r, dtype, "h_n")
    gr, go = _grads(ref), _grads(ours)
    assert_close(go["weight_ih_l0"], gr["weight_ih_l0"][:, :I], dtype, "grad weight_ih_l0")
    assert_close(go["weight_img_l0"], gr["weight_ih_l0"][:, I:], dtype, "grad weight_img_l0")
    for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert_close(go[name], gr[name], dtype, f"grad {name}")
    gxc = xc.grad
    if mode == "unbatched":
        gx_ref, gimg_ref = gxc[:, :I], gxc[:, I:]
    elif batch_first:
        gx_ref, gimg_ref = gxc[..., :I], gxc[..., I:]
    else:
        gx_ref, gimg_ref = gxc[..., :I], gxc[..., I:]
    assert_close(x.grad, gx_ref, dtype, "grad input")
    if image_kind == "static":
        gimg_ref = gimg_ref.sum(1 if batch_first else 0)
    assert_close(img.grad, gimg_ref, dtype, "grad image")


def _reference_stack(module, x, hx, image, lengths=None):
    """A multi-layer, bidirectional image RNN written with the reference op only (time-major input)."""
    from mmrnn_ext.modules import _time_reverse
    from mmrnn_ext.reference import rnn_recurrence_ref

    D = 2 if module.bidirectional else 1
    layer_in, h_n = x, []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_img = module._layer_params(layer, d)
            xp = layer_in @ w_ih.t() + b_ih + b_hh
            it = image @ w_img.t()
            if d == 1:
                xp = _time_reverse(xp, lengths)
                it = _time_reverse(it, lengths) if it.dim() == 3 else it
            o, h = rnn_recurrence_ref(xp, w_hh, hx[layer * D + d], it, lengths, module.nonlinearity)
            outs.append(_time_reverse(o, lengths) if d == 1 else o)
            h_n.append(h)
        layer_in = torch.cat(outs, -1)
    return layer_in, torch.stack(h_n)


@pytest.mark.parametrize("image_kind", ["static", "step"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_multilayer_bidirectional_image_vs_reference(cpu_backend, image_kind, with_lengths):
    dtype = torch.float64
    torch.manual_seed(3)
    m = mmrnn_ext.RNN(I, H, num_layers=3, bidirectional=True, image_size=V, dtype=dtype, backend=cpu_backend)
    B, T = len(LENGTHS), max(LENGTHS)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    hx = torch.randn(6, B, H, dtype=dtype, requires_grad=True)
    img = torch.randn((B, V) if image_kind == "static" else (T, B, V), dtype=dtype, requires_grad=True)
    lens = torch.tensor(LENGTHS) if with_lengths else None
    out, h_n = m(x, hx, image=img, lengths=lens)
    r_out, r_h = _reference_stack(m, x, hx, img, lens)
    assert_close(out, r_out, dtype, "output")
    assert_close(h_n, r_h, dtype, "h_n")
    params = [x, hx, img] + list(m.parameters())
    g1 = torch.autograd.grad(out.sum() + (h_n ** 2).sum(), params)
    g2 = torch.autograd.grad(r_out.sum() + (r_h ** 2).sum(), params)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(a, b, dtype, f"grad #{i}")


def test_padded_lengths_match_packed(cpu_backend):
    torch.manual_seed(4)
    m = mmrnn_ext.RNN(I, H, num_layers=2, bidirectional=True, image_size=V, dtype=torch.float64, backend=cpu_backend)
    B, T = len(LENGTHS), max(LENGTHS)
    x = torch.randn(T, B, I, dtype=torch.float64)
    img = torch.randn(B, V, dtype=torch.float64)
    lens = torch.tensor(LENGTHS)
    out_p, h_p = m(pack_padded_sequence(x, lens, enforce_sorted=False), image=img)
    out_l, h_l = m(x, image=img, lengths=lens)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)
    assert_close(out_l, padded, torch.float64, "output")
    assert_close(h_l, h_p, torch.float64, "h_n")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_image", [False, True], ids=["noimg", "img"])
@pytest.mark.parametrize("give_hx", [False, True], ids=["nohx", "hx"])
def test_cell_matches_torch(cpu_backend, bias, nonlinearity, batched, with_image, give_hx):
    dtype = torch.float64
    torch.manual_seed(5)
    Vi = V if with_image else 0
    ref = nn.RNNCell(I + Vi, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype)
    ours = mmrnn_ext.RNNCell(I, H, bias=bias, nonlinearity=nonlinearity, dtype=dtype,
                             image_size=V if with_image else None, backend=cpu_backend)
    with torch.no_grad():
        ours.weight_ih.copy_(ref.weight_ih[:, :I])
        ours.weight_hh.copy_(ref.weight_hh)
        if with_image:
            ours.weight_img.copy_(ref.weight_ih[:, I:])
        if bias:
            ours.bias_ih.copy_(ref.bias_ih)
            ours.bias_hh.copy_(ref.bias_hh)
    B = 3
    x = torch.randn(B, I, dtype=dtype)
    img = torch.randn(B, V, dtype=dtype)
    hx = torch.randn(B, H, dtype=dtype) if give_hx else None
    if not batched:
        x, img, hx = x[0], img[0], None if hx is None else hx[0]
    xc = torch.cat([x, img], -1) if with_image else x
    xc, x = xc.clone().requires_grad_(), x.clone().requires_grad_()
    hxs = [None, None] if hx is None else [hx.clone().requires_grad_() for _ in range(2)]
    img = img.clone().requires_grad_()
    h_r = ref(xc, hxs[0])
    h_o = ours(x, hxs[1], image=img if with_image else None)
    assert_close(h_o, h_r, dtype, "h'")
    w = torch.randn(h_r.shape, dtype=dtype)
    (h_r * w).sum().backward()
    (h_o * w).sum().backward()
    assert_close(ours.weight_hh.grad, ref.weight_hh.grad, dtype, "grad weight_hh")
    assert_close(ours.weight_ih.grad, ref.weight_ih.grad[:, :I], dtype, "grad weight_ih")
    assert_close(x.grad, xc.grad[..., :I], dtype, "grad input")
    if with_image:
        assert_close(ours.weight_img.grad, ref.weight_ih.grad[:, I:], dtype, "grad weight_img")
        assert_close(img.grad, xc.grad[..., I:], dtype, "grad image")
    if bias:
        assert_close(ours.bias_ih.grad, ref.bias_ih.grad, dtype, "grad bias_ih")
        assert_close(ours.bias_hh.grad, ref.bias_hh.grad, dtype, "grad bias_hh")
    if give_hx:
        assert_close(hxs[1].grad, hxs[0].grad, dtype, "grad hx")


@pytest.mark.parametrize("T,B,Hs", [(1, 1, 1), (1, 3, 7), (7, 1, 1), (5, 2, 65)], ids=lambda v: str(v))
def test_odd_sizes(cpu_backend, T, B, Hs):
    torch.manual_seed(6)
    ref = nn.RNN(I, Hs, dtype=torch.float64)
    ours = mmrnn_ext.RNN(I, Hs, dtype=torch.float64, backend=cpu_backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_r, h_r = _run(ref, x, None)
    out_o, h_o = _run(ours, x, None)
    assert_close(out_o, out_r, torch.float64, "output")
    assert_close(h_o, h_r, torch.float64, "h_n")
    for name, g in _grads(ref).items():
        assert_close(_grads(ours)[name], g, torch.float64, f"grad {name}")


def test_noncontiguous_input_and_hx(cpu_backend):
    torch.manual_seed(8)
    ref = nn.RNN(I, H, num_layers=2, dtype=torch.float64)
    ours = mmrnn_ext.RNN(I, H, num_layers=2, dtype=torch.float64, backend=cpu_backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 2 * I, dtype=torch.float64)[..., ::2]
    hx = torch.randn(2, 3, 3 * H, dtype=torch.float64)[..., 1::3]
    assert not x.is_contiguous() and not hx.is_contiguous()
    out_r, h_r = ref(x, hx)
    out_o, h_o = ours(x, hx)
    assert_close(out_o, out_r, torch.float64, "output")
    assert_close(h_o, h_r, torch.float64, "h_n")


def test_empty_batch_matches_torch(cpu_backend):
    ref = nn.RNN(I, H, num_layers=2, bidirectional=True)
    ours = mmrnn_ext.RNN(I, H, num_layers=2, bidirectional=True, backend=cpu_backend)
    x = torch.randn(4, 0, I)
    out_r, h_r = ref(x)
    out_o, h_o = ours(x)
    assert out_o.shape == out_r.shape and h_o.shape == h_r.shape


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


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(10)
    m = mmrnn_ext.RNN(I, H, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, I)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    c, _ = m(x)
    assert not torch.allclose(a, c)
    single = mmrnn_ext.RNN(I, H, num_layers=2, dropout=0.0)
    single.load_state_dict(m.state_dict())
    d, _ = single(x)
    assert torch.equal(a, d)
