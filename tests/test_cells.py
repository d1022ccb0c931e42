"""mmrnn_ext.RNN / LSTM / GRU and their cells as drop-ins for torch's (the RNN with both
nonlinearities), and their image conditioning."""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import mmrnn_ext
from conftest import assert_close
from mmrnn_ext.modules import _time_reverse
from mmrnn_ext.reference import gru_recurrence_ref, lstm_recurrence_ref, rnn_recurrence_ref

I, H, V, P = 5, 7, 3, 4
LENGTHS = [4, 6, 1, 6]  # unsorted, with ties
TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OURS = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}
TORCH_CELL = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
OURS_CELL = {"rnn": mmrnn_ext.RNNCell, "lstm": mmrnn_ext.LSTMCell, "gru": mmrnn_ext.GRUCell}
ALL = ["rnn", "lstm", "gru"]


def _twins(cell, backend, dtype=torch.float64, image_size=None, **kw):
    """torch's module on input_size I + image_size and ours on I with the same weights (the image
    columns of torch's layer-0 W_ih are our W_img)."""
    torch.manual_seed(0)
    ref = TORCH[cell](I + (image_size or 0), H, dtype=dtype, **kw)
    ours = OURS[cell](I, H, dtype=dtype, image_size=image_size, backend=backend, **kw)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.startswith("weight_img"):
                continue
            src = getattr(ref, name)
            if image_size and name.startswith("weight_ih_l0"):
                p.copy_(src[:, :I])
                getattr(ours, name.replace("weight_ih", "weight_img")).copy_(src[:, I:])
            else:
                p.copy_(src)
    return ref, ours


def _states(h_n):
    return list(h_n) if isinstance(h_n, tuple) else [h_n]


def _run(module, x, hx, **kw):
    module.zero_grad()
    out, h_n = module(x, hx, **kw)
    data = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(7)
    loss = (data * torch.randn(data.shape, generator=g, dtype=data.dtype)).sum()
    for s in _states(h_n):
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    loss.backward()
    return out, h_n


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _cases():
    """variant ("rnn-tanh", "rnn-relu", "lstm", "gru") x layers x bidirectional x batch_first x bias x
    input mode x hx given (x proj_size for the LSTM)."""
    cases = []
    for variant in ("rnn-tanh", "rnn-relu", "lstm", "gru"):
        for L, bi, bf, bias, mode, hx in itertools.product([1, 2, 3], [False, True], [False, True], [False, True],
                                                           ["batched", "unbatched", "packed"], [False, True]):
            for proj in ([0, P] if variant == "lstm" else [0]):
                cases.append((variant, L, bi, bf, bias, mode, hx, proj))
    return cases


GRID = _cases()


def _grid_id(c):
    variant, L, bi, bf, bias, mode, hx, proj = c
    return (f"{variant}-L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'bias' if bias else 'nobias'}-{mode}-"
            f"{'hx' if hx else 'nohx'}" + (f"-proj{proj}" if proj else ""))


def _random_hx(cell, shapes, g, dtype):
    hx = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    return hx


@pytest.mark.parametrize("case", GRID, ids=[_grid_id(c) for c in GRID])
def test_matches_torch(cpu_backend, case):
    variant, num_layers, bidirectional, batch_first, bias, mode, give_hx, proj = case
    cell, _, nonlinearity = variant.partition("-")
    dtype = torch.float64
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj:
        kw["proj_size"] = proj
    if nonlinearity:
        kw["nonlinearity"] = nonlinearity
    ref, ours = _twins(cell, cpu_backend, dtype, **kw)
    D = 2 if bidirectional else 1
    B, T = len(LENGTHS), max(LENGTHS)
    g = torch.Generator().manual_seed(1)
    shape = (T, I) if mode == "unbatched" else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, generator=g, dtype=dtype)
    sizes = [proj or H, H] if cell == "lstm" else [H]
    lead = (num_layers * D,) if mode == "unbatched" else (num_layers * D, B)
    hx = _random_hx(cell, [lead + (s,) for s in sizes], g, dtype) if give_hx else None
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hxs = [None, None] if hx is None else [[h.clone().requires_grad_() for h in hx] for _ in range(2)]
    as_arg = [None if h is None else (tuple(h) if cell == "lstm" else h[0]) for h in hxs]
    if mode == "packed":
        ins = [pack_padded_sequence(xi, torch.tensor(LENGTHS), batch_first=batch_first, enforce_sorted=False) for xi in xs]
    else:
        ins = xs
    out_r, h_r = _run(ref, ins[0], as_arg[0])
    out_o, h_o = _run(ours, ins[1], as_arg[1])
    if mode == "packed":
        assert isinstance(out_o, PackedSequence)
        assert torch.equal(out_o.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_o.sorted_indices, out_r.sorted_indices)
        out_r, out_o = out_r.data, out_o.data
    assert type(h_o) is type(h_r)
    assert_close(out_o, out_r, dtype, "output")
    for k, (a, b) in enumerate(zip(_states(h_o), _states(h_r))):
        assert a.shape == b.shape
        assert_close(a, b, dtype, f"final state {k}")
    gr, go = _grads(ref), _grads(ours)
    assert set(gr) == set(go)
    for name in gr:
        assert_close(go[name], gr[name], dtype, f"grad {name}")
    assert_close(xs[1].grad, xs[0].grad, dtype, "grad input")
    if give_hx:
        for k, (a, b) in enumerate(zip(hxs[1], hxs[0])):
            assert_close(a.grad, b.grad, dtype, f"grad hx[{k}]")


@pytest.mark.parametrize("cell", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_matches_torch_fp32_sample(cpu_backend, cell, dtype, bidirectional):
    ref, ours = _twins(cell, cpu_backend, dtype, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(9, 3, I, dtype=dtype)
    out_r, h_r = _run(ref, x, None)
    out_o, h_o = _run(ours, x, None)
    assert_close(out_o, out_r, dtype, "output")
    for a, b in zip(_states(h_o), _states(h_r)):
        assert_close(a, b, dtype, "final state")
    for name, g in _grads(ref).items():
        assert_close(_grads(ours)[name], g, dtype, f"grad {name}")


@pytest.mark.parametrize("cell", ALL)
@pytest.mark.parametrize("image_kind", ["static", "step"])
@pytest.mark.parametrize("mode", ["batched", "batch_first", "unbatched", "packed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_image_equals_concatenated_input(cpu_backend, cell, image_kind, mode, dtype):
    """LSTM/GRU(image_size=V) == torch's on the input concatenated with the image, every gradient too."""
    batch_first = mode == "batch_first"
    ref, ours = _twins(cell, cpu_backend, dtype, image_size=V, batch_first=batch_first)
    B, T = len(LENGTHS), max(LENGTHS)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    img = torch.randn((B, V) if image_kind == "static" else (T, B, V), generator=g, dtype=dtype)
    xc = torch.cat([x, img.expand(T, B, V) if image_kind == "static" else img], dim=-1)
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
    for a, b in zip(_states(h_o), _states(h_r)):
        assert_close(a, b, dtype, "final state")
    gr, go = _grads(ref), _grads(ours)
    assert_close(go["weight_ih_l0"], gr["weight_ih_l0"][:, :I], dtype, "grad weight_ih_l0")
    assert_close(go["weight_img_l0"], gr["weight_ih_l0"][:, I:], dtype, "grad weight_img_l0")
    for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        assert_close(go[name], gr[name], dtype, f"grad {name}")
    gx_ref, gimg_ref = xc.grad[..., :I], xc.grad[..., I:]
    assert_close(x.grad, gx_ref, dtype, "grad input")
    if image_kind == "static":
        gimg_ref = gimg_ref.sum(1 if batch_first else 0) if mode != "unbatched" else gimg_ref.sum(0)
    assert_close(img.grad, gimg_ref, dtype, "grad image")


def _reference_stack(module, x, hx, image, lengths=None):
    """A multi-layer bidirectional image RNN/LSTM/GRU written with the reference recurrences only."""
    D = 2 if module.bidirectional else 1
    layer_in, finals = x, []
    H3 = module.hidden_size
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_img = module._layer_params(layer, d)
            idx = layer * D + d
            if not isinstance(module, mmrnn_ext.GRU):
                xp = layer_in @ w_ih.t() + b_ih + b_hh
            else:
                xp = layer_in @ w_ih.t() + b_ih + torch.cat([b_hh[:2 * H3], torch.zeros_like(b_hh[2 * H3:])])
            it = image @ w_img.t()
            if d == 1:
                xp = _time_reverse(xp, lengths)
                it = _time_reverse(it, lengths) if it.dim() == 3 else it
            if isinstance(module, mmrnn_ext.LSTM):
                o, h, c = lstm_recurrence_ref(xp, w_hh, hx[0][idx], hx[1][idx], it, lengths)
                finals.append((h, c))
            elif isinstance(module, mmrnn_ext.RNN):
                o, h = rnn_recurrence_ref(xp, w_hh, hx[idx], it, lengths, module.nonlinearity)
                finals.append((h,))
            else:
                o, h = gru_recurrence_ref(xp, w_hh, hx[idx], it, lengths, b_hh[2 * H3:])
                finals.append((h,))
            outs.append(_time_reverse(o, lengths) if d == 1 else o)
        layer_in = torch.cat(outs, -1)
    return layer_in, [torch.stack(s) for s in zip(*finals)]


@pytest.mark.parametrize("cell", ALL)
@pytest.mark.parametrize("image_kind", ["static", "step"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_multilayer_bidirectional_image_vs_reference(cpu_backend, cell, image_kind, with_lengths):
    dtype = torch.float64
    torch.manual_seed(3)
    m = OURS[cell](I, H, num_layers=3, bidirectional=True, image_size=V, dtype=dtype, backend=cpu_backend)
    B, T = len(LENGTHS), max(LENGTHS)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    hx = [torch.randn(6, B, H, dtype=dtype, requires_grad=True) for _ in range(2 if cell == "lstm" else 1)]
    img = torch.randn((B, V) if image_kind == "static" else (T, B, V), dtype=dtype, requires_grad=True)
    lens = torch.tensor(LENGTHS) if with_lengths else None
    out, h_n = m(x, tuple(hx) if cell == "lstm" else hx[0], image=img, lengths=lens)
    r_out, r_states = _reference_stack(m, x, hx if cell == "lstm" else hx[0], img, lens)
    assert_close(out, r_out, dtype, "output")
    for a, b in zip(_states(h_n), r_states):
        assert_close(a, b, dtype, "final state")
    params = [x, *hx, img] + list(m.parameters())
    g1 = torch.autograd.grad(out.sum() + sum((s ** 2).sum() for s in _states(h_n)), params)
    g2 = torch.autograd.grad(r_out.sum() + sum((s ** 2).sum() for s in r_states), params)
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert_close(a, b, dtype, f"grad #{i}")


@pytest.mark.parametrize("cell", ALL)
def test_padded_lengths_match_packed(cpu_backend, cell):
    torch.manual_seed(4)
    m = OURS[cell](I, H, num_layers=2, bidirectional=True, image_size=V, dtype=torch.float64, backend=cpu_backend)
    B, T = len(LENGTHS), max(LENGTHS)
    x = torch.randn(T, B, I, dtype=torch.float64)
    img = torch.randn(B, V, dtype=torch.float64)
    lens = torch.tensor(LENGTHS)
    out_p, h_p = m(pack_padded_sequence(x, lens, enforce_sorted=False), image=img)
    out_l, h_l = m(x, image=img, lengths=lens)
    padded, _ = pad_packed_sequence(out_p, total_length=T)
    assert_close(out_l, padded, torch.float64, "output")
    for a, b in zip(_states(h_l), _states(h_p)):
        assert_close(a, b, torch.float64, "final state")


@pytest.mark.parametrize("variant", ["rnn-tanh", "rnn-relu", "lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_image", [False, True], ids=["noimg", "img"])
@pytest.mark.parametrize("give_hx", [False, True], ids=["nohx", "hx"])
def test_cell_matches_torch(cpu_backend, variant, bias, batched, with_image, give_hx):
    dtype = torch.float64
    torch.manual_seed(5)
    cell, _, nonlinearity = variant.partition("-")
    kw = {"nonlinearity": nonlinearity} if nonlinearity else {}
    Vi = V if with_image else 0
    ref = TORCH_CELL[cell](I + Vi, H, bias=bias, dtype=dtype, **kw)
    ours = OURS_CELL[cell](I, H, bias=bias, dtype=dtype, image_size=V if with_image else None, backend=cpu_backend, **kw)
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
    n_states = 2 if cell == "lstm" else 1
    hx = [torch.randn(B, H, dtype=dtype) for _ in range(n_states)] if give_hx else None
    if not batched:
        x, img, hx = x[0], img[0], None if hx is None else [h[0] for h in hx]
    xc = torch.cat([x, img], -1) if with_image else x
    xc, x = xc.clone().requires_grad_(), x.clone().requires_grad_()
    hxs = [None, None] if hx is None else [[h.clone().requires_grad_() for h in hx] for _ in range(2)]
    args = [None if h is None else (tuple(h) if cell == "lstm" else h[0]) for h in hxs]
    img = img.clone().requires_grad_()
    s_r = _states(ref(xc, args[0]))
    s_o = _states(ours(x, args[1], image=img if with_image else None))
    loss_r = loss_o = 0
    for k, (a, b) in enumerate(zip(s_o, s_r)):
        assert_close(a, b, dtype, f"state {k}")
        w = torch.randn(b.shape, dtype=dtype)
        loss_r, loss_o = loss_r + (b * w).sum(), loss_o + (a * w).sum()
    loss_r.backward()
    loss_o.backward()
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
        for k in range(n_states):
            assert_close(hxs[1][k].grad, hxs[0][k].grad, dtype, f"grad hx[{k}]")


@pytest.mark.parametrize("cell", ALL)
@pytest.mark.parametrize("T,B,Hs", [(1, 1, 1), (1, 3, 7), (7, 1, 1), (5, 2, 65)], ids=lambda v: str(v))
def test_odd_sizes(cpu_backend, cell, T, B, Hs):
    torch.manual_seed(6)
    ref = TORCH[cell](I, Hs, dtype=torch.float64)
    ours = OURS[cell](I, Hs, dtype=torch.float64, backend=cpu_backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_r, h_r = _run(ref, x, None)
    out_o, h_o = _run(ours, x, None)
    assert_close(out_o, out_r, torch.float64, "output")
    for a, b in zip(_states(h_o), _states(h_r)):
        assert_close(a, b, torch.float64, "final state")
    for name, g in _grads(ref).items():
        assert_close(_grads(ours)[name], g, torch.float64, f"grad {name}")


@pytest.mark.parametrize("cell", ALL)
def test_noncontiguous_input_and_hx(cpu_backend, cell):
    torch.manual_seed(8)
    ref = TORCH[cell](I, H, num_layers=2, dtype=torch.float64)
    ours = OURS[cell](I, H, num_layers=2, dtype=torch.float64, backend=cpu_backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 2 * I, dtype=torch.float64)[..., ::2]
    hx = [torch.randn(2, 3, 3 * H, dtype=torch.float64)[..., 1::3] for _ in range(2)]
    assert not x.is_contiguous() and not hx[0].is_contiguous()
    arg = tuple(hx) if cell == "lstm" else hx[0]
    out_r, h_r = ref(x, arg)
    out_o, h_o = ours(x, arg)
    assert_close(out_o, out_r, torch.float64, "output")
    for a, b in zip(_states(h_o), _states(h_r)):
        assert_close(a, b, torch.float64, "final state")


@pytest.mark.parametrize("cell", ALL)
def test_empty_batch_matches_torch(cpu_backend, cell):
    ref = TORCH[cell](I, H, num_layers=2, bidirectional=True)
    ours = OURS[cell](I, H, num_layers=2, bidirectional=True, backend=cpu_backend)
    x = torch.randn(4, 0, I)
    out_r, h_r = ref(x)
    out_o, h_o = ours(x)
    assert out_o.shape == out_r.shape
    assert [s.shape for s in _states(h_o)] == [s.shape for s in _states(h_r)]


@pytest.mark.parametrize("cell", ALL)
def test_state_dict_and_init_match_torch(cell):
    kw = dict(num_layers=2, bidirectional=True, bias=False)
    if cell == "lstm":
        kw["proj_size"] = P
    torch.manual_seed(9)
    ref = TORCH[cell](I, H, **kw)
    torch.manual_seed(9)
    ours = OURS[cell](I, H, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1  # same names, shapes and initial values
    ours.load_state_dict(ref.state_dict(), strict=True)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    img = OURS[cell](I, H, num_layers=2, bidirectional=True, image_size=V)
    assert img.weight_img_l1_reverse.shape == (G * H, V)
    stdv = 1 / H ** 0.5
    assert img.weight_img_l0.abs().max() <= stdv and img.weight_img_l0.std() > 0
    torch.manual_seed(9)
    ref_cell = TORCH_CELL[cell](I, H)
    torch.manual_seed(9)
    our_cell = OURS_CELL[cell](I, H)
    for (n1, p1), (n2, p2) in zip(our_cell.named_parameters(), ref_cell.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert OURS_CELL[cell](I, H, image_size=V).weight_img.shape == (G * H, V)


def test_rnn_repr_and_flatten_parameters():
    m = mmrnn_ext.RNN(I, H, 2, nonlinearity="relu", batch_first=True, bidirectional=True, image_size=V)
    assert repr(m) == f"RNN({I}, {H}, num_layers=2, nonlinearity=relu, batch_first=True, bidirectional=True, image_size={V})"
    assert repr(mmrnn_ext.RNN(I, H)) == repr(nn.RNN(I, H))
    assert repr(mmrnn_ext.RNNCell(I, H)) == repr(nn.RNNCell(I, H))
    m.flatten_parameters()
    assert len(m.all_weights) == 4 and len(m.all_weights[0]) == 5


def test_repr_matches_torch():
    assert repr(mmrnn_ext.LSTM(I, H, 2, proj_size=P, batch_first=True)) == repr(nn.LSTM(I, H, 2, proj_size=P, batch_first=True))
    assert repr(mmrnn_ext.GRU(I, H, bidirectional=True, bias=False)) == repr(nn.GRU(I, H, bidirectional=True, bias=False))
    assert repr(mmrnn_ext.LSTMCell(I, H, bias=False)) == repr(nn.LSTMCell(I, H, bias=False))
    assert repr(mmrnn_ext.GRUCell(I, H)) == repr(nn.GRUCell(I, H))
    assert repr(mmrnn_ext.GRU(I, H, image_size=V)) == f"GRU({I}, {H}, image_size={V})"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_zero_length_sequence_raises_like_torch(cell):
    """torch raises for a sequence of length 0; so does every mmrnn_ext module (a row of length 0
    through `lengths` is fine: its final state is its initial one)."""
    ours = {"rnn": mmrnn_ext.RNN, **OURS}[cell](I, H)
    ref = {"rnn": nn.RNN, **TORCH}[cell](I, H)
    x = torch.randn(0, 2, I)
    with pytest.raises(RuntimeError, match="larger than 0"):
        ref(x)
    with pytest.raises(mmrnn_ext.InputError, match="at least one step"):
        ours(x)


@pytest.mark.parametrize("cell", ALL)
def test_dropout_between_layers_only_in_training(cell):
    torch.manual_seed(10)
    m = OURS[cell](I, H, num_layers=2, dropout=0.5)
    x = torch.randn(5, 3, I)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    c, _ = m(x)
    assert not torch.allclose(a, c)
    plain = OURS[cell](I, H, num_layers=2, dropout=0.0)
    plain.load_state_dict(m.state_dict())
    d, _ = plain(x)
    assert torch.equal(a, d)
