"""The cells' step with gradients (csrc/cell_train.cpp: the whole step one autograd node, backward one
C++ call): every cell against torch's cell on the concatenated input, forward and every gradient, at
odd sizes, float64 and float32; a teacher-forced loop with a shrinking batch; gradcheck and
gradgradcheck; and the paths that must not take it (compile, torch.func, autocast) still right."""
import pytest
import torch
from torch import nn

import mmrnn_ext
from conftest import TOL, assert_close, require

OURS = {"rnn": mmrnn_ext.RNNCell, "relu": mmrnn_ext.RNNCell, "lstm": mmrnn_ext.LSTMCell, "gru": mmrnn_ext.GRUCell}
TORCH = {"rnn": nn.RNNCell, "relu": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}
KINDS = list(OURS)


@pytest.fixture(autouse=True)
def _cpp():
    require("cpp")


def _pair(kind, I, V, H, bias=True, dtype=torch.float64, seed=0):
    """(ours with image_size=V, torch's cell on I + V inputs computing the same function)."""
    torch.manual_seed(seed)
    kw = {"nonlinearity": "relu"} if kind == "relu" else {}
    ours = OURS[kind](I, H, bias=bias, image_size=V, dtype=dtype, **kw)
    ref = TORCH[kind](I + V, H, bias=bias, dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.cat([ours.weight_ih, ours.weight_img], 1) if name == "weight_ih" else getattr(ours, name))
    return ours, ref


def _node(out):
    t = out[0] if isinstance(out, tuple) else out
    fn = t.grad_fn
    while fn is not None and fn.name() in ("SqueezeBackward1", "SqueezeBackward0"):
        fn = fn.next_functions[0][0]
    return fn.name().rsplit("::", 1)[-1].rstrip(">")  # CppNode<mmrnn::...::CellTrain> -> CellTrain


def _grads(module, outs, inputs, weights):
    """d(outs . weights) with respect to inputs, then weight_ih, weight_hh (and the biases)."""
    params = [module.weight_ih, module.weight_hh] + ([module.bias_ih, module.bias_hh] if module.bias else [])
    return torch.autograd.grad(outs, inputs + params, weights)


SIZES = [(1, 1, 1, 1), (3, 7, 5, 65), (7, 3, 2, 7), (65, 5, 3, 9)]  # (B, I, V, H)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,I,V,H", SIZES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_step_with_gradients_matches_torch_cell(kind, dtype, B, I, V, H, bias):
    ours, ref = _pair(kind, I, V, H, bias, dtype)
    gen = torch.Generator().manual_seed(B * 100 + H)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    x, v, h, c = rnd(B, I), rnd(B, V), rnd(B, H), rnd(B, H)
    hx = (h, c) if kind == "lstm" else h
    out = ours(x, hx, image=v)
    assert _node(out) == "CellTrain"
    want = ref(torch.cat([x, v], 1), hx)
    outs = list(out) if isinstance(out, tuple) else [out]
    wants = list(want) if isinstance(want, tuple) else [want]
    for a, b in zip(outs, wants):
        assert_close(a, b, dtype, f"{kind} output")
    weights = [torch.randn(o.shape, generator=gen, dtype=dtype) for o in outs]
    ins = [x, v, h] + ([c] if kind == "lstm" else [])
    g_ours = list(_grads(ours, outs, ins + [ours.weight_img], weights))
    g_ref = list(_grads(ref, wants, ins, weights))
    k = len(ins)
    # torch's weight_ih covers [x | image]: ours is its first I columns, weight_img the rest
    assert_close(g_ours.pop(k), g_ref[k][:, I:], dtype, f"{kind} weight_img grad")
    g_ref[k] = g_ref[k][:, :I]
    names = ["x", "image", "h", "c"][:k] + ["weight_ih", "weight_hh", "bias_ih", "bias_hh"][:2 + 2 * bias]
    for name, a, b in zip(names, g_ours, g_ref):
        assert_close(a, b, dtype, f"{kind} grad of {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_and_hx_none(kind):
    ours, ref = _pair(kind, 4, 3, 6)
    x, v = torch.randn(4, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)
    for hx in (None, (torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64))
               if kind == "lstm" else torch.randn(6, dtype=torch.float64)):
        out, want = ours(x, hx, image=v), ref(torch.cat([x, v]), hx)
        outs = out if isinstance(out, tuple) else (out,)
        wants = want if isinstance(want, tuple) else (want,)
        assert all(o.shape == w.shape for o, w in zip(outs, wants))
        for o, w in zip(outs, wants):
            assert_close(o, w, torch.float64, f"{kind} unbatched")
        ga = torch.autograd.grad(sum(o.sum() for o in outs), [x, v])
        gb = torch.autograd.grad(sum(w.sum() for w in wants), [x, v])
        assert_close(ga[0], gb[0][:4] if gb[0].numel() == 7 else gb[0], torch.float64, "x grad")


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_loop_with_shrinking_batch(kind):
    """The attention-decoder pattern: one cell call per step with gradients, the batch shrinking as
    sequences end (h[:b]), a context vector per step as the image; every parameter's gradient."""
    ours, ref = _pair(kind, 5, 4, 8)
    gen = torch.Generator().manual_seed(3)
    steps = [6, 6, 4, 3, 1]
    xs = [torch.randn(b, 5, generator=gen, dtype=torch.float64) for b in steps]
    vs = [torch.randn(b, 4, generator=gen, dtype=torch.float64) for b in steps]

    def run(cell, concat):
        state = None
        total = 0
        for x, v in zip(xs, vs):
            b = x.shape[0]
            if state is not None:
                state = tuple(s[:b] for s in state) if kind == "lstm" else state[:b]
            state = cell(torch.cat([x, v], 1), state) if concat else cell(x, state, image=v)
            h = state[0] if kind == "lstm" else state
            total = total + (h * h).sum()
        return total

    loss_o, loss_r = run(ours, False), run(ref, True)
    assert_close(loss_o, loss_r, torch.float64, "loss")
    loss_o.backward()
    loss_r.backward()
    assert_close(ours.weight_ih.grad, ref.weight_ih.grad[:, :5], torch.float64, "weight_ih")
    assert_close(ours.weight_img.grad, ref.weight_ih.grad[:, 5:], torch.float64, "weight_img")
    for name in ("weight_hh", "bias_ih", "bias_hh"):
        assert_close(getattr(ours, name).grad, getattr(ref, name).grad, torch.float64, name)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck(kind):
    ours, _ = _pair(kind, 3, 2, 4)
    gen = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, v, h, c, w = rnd(2, 3), rnd(2, 2), rnd(2, 4), rnd(2, 4), ours.weight_hh.detach().clone().requires_grad_()

    def f(x, v, h, c, w):
        hx = (h, c) if kind == "lstm" else h
        return torch.func.functional_call(ours, {"weight_hh": w}, (x, hx), {"image": v})

    def fast(x, v, h, c, w):  # the same call, outside torch.func: the C++ node
        out = f(x, v, h, c, w)
        assert _node(out) == "CellTrain"
        return out

    assert torch.autograd.gradcheck(fast, (x, v, h, c, w))
    assert torch.autograd.gradgradcheck(fast, (x, v, h, c, w))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_and_compile_take_the_checked_path(kind):
    ours, ref = _pair(kind, 3, 2, 5, dtype=torch.float32)
    x, v, h = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 5)
    hx = (h, torch.randn(4, 5)) if kind == "lstm" else h
    params = dict(ours.named_parameters())

    def loss(p, x):
        out = torch.func.functional_call(ours, p, (x, hx), {"image": v})
        return (out[0] if isinstance(out, tuple) else out).square().sum()

    g_func = torch.func.grad(loss, argnums=1)(params, x)
    xg = x.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(loss(params, xg), xg)
    assert_close(g_func, g_eager, torch.float32, "torch.func.grad")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ours(x, hx, image=v), fullgraph=True, backend="aot_eager")
    xg2 = x.clone().requires_grad_()
    out = compiled(xg2)
    out = out[0] if isinstance(out, tuple) else out
    (g_comp,) = torch.autograd.grad(out.square().sum(), xg2)
    assert_close(g_comp, g_eager, torch.float32, "torch.compile")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_with_gradients_still_gets_the_checked_error(kind):
    ours, _ = _pair(kind, 3, 2, 5, dtype=torch.float32)
    x = torch.randn(4, 3, requires_grad=True)
    h = torch.randn(4, 5)
    hx = (h, h) if kind == "lstm" else h
    with pytest.raises(mmrnn_ext.InputError, match="image"):
        ours(x, hx, image=torch.randn(4, 3))  # image_size is 2
    with pytest.raises(mmrnn_ext.InputError, match="hx"):
        ours(x, ((h[:3], h[:3]) if kind == "lstm" else h[:3]), image=torch.randn(4, 2))
    with pytest.raises(mmrnn_ext.InputError, match="input"):
        ours(torch.randn(4, 3, dtype=torch.float64, requires_grad=True), hx, image=torch.randn(4, 2))


def test_attention_decoder_equals_the_one_on_torch_cells():
    """mmrnn_ext.models.AttentionDecoder on mmrnn_ext.LSTMCell (context as the image) against the same
    decoder on nn.LSTMCell over the concatenation: the loss and every gradient (float64)."""
    from mmrnn_ext.models import AttentionDecoder

    torch.manual_seed(5)
    kw = dict(embed=6, hidden=7, features=5, attention=4)
    stock = AttentionDecoder(11, cell="torch", **kw).double()
    ours = AttentionDecoder(11, cell="mmrnn_ext", **kw).double().copy_from(stock)
    regions = torch.randn(4, 3, 5, dtype=torch.float64)
    captions = torch.randint(0, 11, (4, 6))
    lengths = torch.tensor([5, 4, 4, 1])
    lo, ls = ours(regions, captions, lengths), stock(regions, captions, lengths)
    assert_close(lo, ls, torch.float64, "loss")
    lo.backward()
    ls.backward()
    grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        if name == "cell.weight_img":
            want = grads["cell.weight_ih"].grad[:, 6:]
        elif name == "cell.weight_ih":
            want = grads["cell.weight_ih"].grad[:, :6]
        else:
            want = grads[name].grad
        assert_close(p.grad, want, torch.float64, name)


def test_attention_captioning_example_runs():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "attention_captioning.py"), "--small",
                           "--iterations", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("iteration")]
    assert len(lines) == 2
    for line in lines:
        assert float(line.split("difference ")[1].rstrip(")")) <= 1e-5
    assert "time per iteration" in proc.stdout


@pytest.mark.parametrize("which", ["h", "c"])
def test_lstm_gradient_through_one_output_only(which):
    """Backward with one of (h', c') given no gradient (left undefined, not zero-filled)."""
    ours, ref = _pair("lstm", 4, 3, 6)
    gen = torch.Generator().manual_seed(9)
    x, v = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    hx = tuple(torch.randn(5, 6, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    k = 0 if which == "h" else 1
    (ours(x, hx, image=v)[k] ** 2).sum().backward()
    got = [t.grad.clone() for t in hx] + [ours.weight_hh.grad]
    for t in hx:
        t.grad = None
    (ref(torch.cat([x, v], 1), hx)[k] ** 2).sum().backward()
    for a, b in zip(got, [t.grad for t in hx] + [ref.weight_hh.grad]):
        assert_close(a, b, torch.float64, f"through {which}' only")
