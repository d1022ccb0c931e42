"""Second-order gradients through every cell's fused recurrence (exact, never a silent constant),
forward-mode AD, and the torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, vmap)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import mmrnn_ext
from conftest import require
from mmrnn_ext.reference import rnn_recurrence_ref
from test_gated_ops import make_inputs as gated_inputs
from test_gated_ops import run_op as gated_op
from test_gated_ops import run_ref as gated_ref
from op_cases import make_inputs as rnn_inputs

CELLS = ["rnn", "lstm", "gru"]
MODULES = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}
TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
I, H, V = 3, 7, 2


def _op_case(cell, backend, image, lengths, dtype=torch.float64):
    """(function of the differentiable inputs, those inputs) for one op call on B=3, T=5, H=7."""
    if cell == "rnn":
        *args, lens = rnn_inputs(5, 3, H, image, dtype, lengths=lengths, seed=3)
        run = lambda a: mmrnn_ext.rnn_recurrence(*a, lengths=lens, backend=backend)  # noqa: E731
    else:
        args, lens = gated_inputs(cell, 5, 3, H, image, dtype, lengths=lengths, seed=3)
        run = lambda a: gated_op(cell, backend, a, lens)  # noqa: E731
    present = [i for i, a in enumerate(args) if a is not None]

    def fn(*ins):
        full = list(args)
        for i, t in zip(present, ins):
            full[i] = t
        return run(full)

    return fn, [args[i] for i in present]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("image", ["static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_op_gradgradcheck(cpu_backend, cell, image, lengths):
    fn, inputs = _op_case(cell, cpu_backend, image, lengths)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("image", ["static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_module_gradgradcheck(cpu_backend, cell, image, lengths):
    """2 layers, bidirectional, through the input, the image, hx and a recurrent weight."""
    torch.manual_seed(0)
    m = MODULES[cell](I, H, num_layers=2, bidirectional=True, image_size=V, dtype=torch.float64, backend=cpu_backend)
    B, T = 3, 5
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    img = torch.randn((B, V) if image == "static" else (T, B, V), dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    w = m.weight_hh_l1_reverse.detach().clone().requires_grad_()
    lens = torch.tensor([5, 2, 4]) if lengths else None

    def fn(x, img, hx, w):
        state = (hx, torch.tanh(hx)) if cell == "lstm" else hx
        out, h_n = functional_call(m, {"weight_hh_l1_reverse": w}, (x, state), {"image": img, "lengths": lens})
        return (out, *h_n) if isinstance(h_n, tuple) else (out, h_n)

    assert torch.autograd.gradgradcheck(fn, (x, img, hx, w), fast_mode=True)


def test_triton_second_order_matches_float64():
    """Under the interpreter the Triton kernels give the first-order pass; a second-order pass then
    runs the differentiable BPTT on their saved outputs (float32) and agrees with float64."""
    require("triton")
    results = []
    for backend, dtype in (("triton", torch.float32), ("cpp" if mmrnn_ext.backends()["cpp"]["available"] else "reference",
                                                       torch.float64)):
        xp, w, h0, img, _ = rnn_inputs(4, 3, 16, "static", dtype, seed=4)
        out, h = mmrnn_ext.rnn_recurrence(xp, w, h0, img, backend=backend)
        g_xp, g_w = torch.autograd.grad(out.square().sum() + h.sum(), (xp, w), create_graph=True)
        results.append(torch.autograd.grad(g_xp.square().sum() + g_w.square().sum(), (xp, w, h0, img)))
    for a, b in zip(*results):
        rel = ((a.double() - b).norm() / b.norm()).item()
        print(f"relative difference {rel:.2e}")
        assert rel <= 1e-5


def _twins(cell, backend):
    """Ours with image_size=V and torch's on input I + V with the same weights (the image ≡ extra columns)."""
    torch.manual_seed(1)
    ref = TORCH[cell](I + V, H, dtype=torch.float64)
    ours = MODULES[cell](I, H, image_size=V, dtype=torch.float64, backend=backend)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name == "weight_img_l0":
                p.copy_(ref.weight_ih_l0[:, I:])
            elif name == "weight_ih_l0":
                p.copy_(ref.weight_ih_l0[:, :I])
            else:
                p.copy_(getattr(ref, name))
    return ref, ours


def _inputs(T=6, B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    img = torch.randn(B, V, generator=g, dtype=torch.float64)
    return x, img


def _run(module, x, img, concat):
    if concat:
        return module(torch.cat([x, img.expand(x.shape[0], -1, -1)], -1))[0]
    return module(x, image=img)[0]


def _param_grads(ref, ours):
    """ours' parameter gradients in torch's layout (W_ih and W_img joined)."""
    g = {n: p.grad for n, p in ours.named_parameters()}
    g["weight_ih_l0"] = torch.cat([g.pop("weight_ih_l0"), g.pop("weight_img_l0")], 1)
    return g


@pytest.mark.parametrize("cell", CELLS)
def test_gradient_penalty_step_matches_torch(cpu_backend, cell):
    """A WGAN-GP-style step: loss = critic + (||d critic / d input|| - 1)^2, backward into the weights."""
    ref, ours = _twins(cell, cpu_backend)
    x, img = _inputs()
    for module, concat in ((ref, True), (ours, False)):
        xi, im = x.clone().requires_grad_(), img.clone().requires_grad_()
        critic = _run(module, xi, im, concat).sum(0).square().sum()
        gx, gi = torch.autograd.grad(critic, (xi, im), create_graph=True)
        penalty = (torch.cat([gx.flatten(), gi.flatten()]).norm() - 1) ** 2
        (critic + 10 * penalty).backward()
    got, want = _param_grads(ref, ours), {n: p.grad for n, p in ref.named_parameters()}
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_hessian_vector_product_matches_torch(cpu_backend, cell):
    ref, ours = _twins(cell, cpu_backend)
    x, img = _inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    vecs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ref.parameters()]
    hvps = []
    for module, concat in ((ref, True), (ours, False)):
        params = [p for p in ref.parameters()] if module is ref else None
        loss = _run(module, x, img, concat).tanh().sum()
        if module is ref:
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hvps.append(torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, vecs)), params))
        else:
            names = [n for n, _ in ref.named_parameters()]
            own = dict(ours.named_parameters())
            params = [own[n] for n in names] + [own["weight_img_l0"]]
            grads = torch.autograd.grad(loss, params, create_graph=True)
            grads = [torch.cat([grads[0], grads[-1]], 1)] + list(grads[1:-1])
            hv = torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, vecs)), params)
            hvps.append([torch.cat([hv[0], hv[-1]], 1)] + list(hv[1:-1]))
    for a, b in zip(hvps[1], hvps[0]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward_without_create_graph_on_second_pass(cpu_backend, cell):
    """The issue's report: grad with create_graph, then a plain backward of a function of it."""
    ref, ours = _twins(cell, cpu_backend)
    x, img = _inputs(seed=7)
    grads = []
    for module, concat in ((ref, True), (ours, False)):
        xi = x.clone().requires_grad_()
        g, = torch.autograd.grad(_run(module, xi, img, concat).sum(), xi, create_graph=True)
        (g ** 2).sum().backward()
        assert xi.grad is not None
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_func_grad_and_vjp(cpu_backend, cell):
    torch.manual_seed(3)
    m = MODULES[cell](I, H, image_size=V, dtype=torch.float64, backend=cpu_backend)
    x, img = _inputs()
    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p, x):
        return functional_call(m, p, (x,), {"image": img})[0].square().sum()

    got = torch.func.grad(loss, argnums=(0, 1))(params, x)
    xr = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(dict(m.named_parameters()), xr), list(m.parameters()) + [xr])
    for (name, g), w in zip(got[0].items(), want[:-1]):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12, msg=lambda msg: f"{name}: {msg}")
    torch.testing.assert_close(got[1], want[-1], atol=1e-12, rtol=1e-12)
    out, pullback = torch.func.vjp(lambda x: m(x, image=img)[0], x)
    cot = torch.randn_like(out)
    (gx,) = pullback(cot)
    (want_x,) = torch.autograd.grad(m(xr, image=img)[0], xr, cot)
    torch.testing.assert_close(gx, want_x, atol=1e-12, rtol=1e-12)
    # second order through torch.func: grad of grad
    hess_diag = torch.func.grad(lambda x: torch.func.grad(lambda y: m(y, image=img)[0].square().sum())(x).sum())(x)
    g1, = torch.autograd.grad(m(xr, image=img)[0].square().sum(), xr, create_graph=True)
    want_h, = torch.autograd.grad(g1.sum(), xr)
    torch.testing.assert_close(hess_diag, want_h, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("image", ["static", "step"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_op_jvp_matches_the_definition(cpu_backend, cell, image, lengths):
    """Forward mode through the fused op equals forward mode through its plain-PyTorch definition,
    for the tangents of every input."""
    if cell == "rnn":
        *args, lens = rnn_inputs(5, 3, H, image, torch.float64, lengths=lengths, seed=3)
        op = lambda *a: mmrnn_ext.rnn_recurrence(*a, lengths=lens, backend=cpu_backend)  # noqa: E731
        ref = lambda *a: rnn_recurrence_ref(*a, lengths=lens)  # noqa: E731
    else:
        args, lens = gated_inputs(cell, 5, 3, H, image, torch.float64, lengths=lengths, seed=3)
        op = lambda *a: gated_op(cell, cpu_backend, list(a), lens)  # noqa: E731
        ref = lambda *a: gated_ref(cell, list(a), lens)  # noqa: E731
    args = tuple(a.detach() for a in args)
    g = torch.Generator().manual_seed(8)
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=a.dtype) for a in args)
    out, t_ours = torch.func.jvp(op, args, tangents)
    _, t_ref = torch.func.jvp(ref, args, tangents)
    for a, b in zip(t_ours, t_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_module_forward_mode_matches_reverse_mode(cpu_backend, cell):
    """jacfwd (forward mode, vmapped) and jacrev agree on a 2-layer bidirectional module with lengths;
    forward_ad's dual tensors give the same directional derivative."""
    torch.manual_seed(9)
    m = MODULES[cell](I, 4, num_layers=2, bidirectional=True, image_size=V, dtype=torch.float64, backend=cpu_backend)
    x, img = _inputs(T=4, B=2)
    f = lambda x: m(x, image=img, lengths=torch.tensor([4, 3]))[0]  # noqa: E731
    jf = torch.func.jacfwd(f)(x)
    torch.testing.assert_close(jf, torch.func.jacrev(f)(x), atol=1e-12, rtol=1e-12)
    direction = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        tangent = torch.autograd.forward_ad.unpack_dual(f(torch.autograd.forward_ad.make_dual(x, direction))).tangent
    torch.testing.assert_close(tangent, (jf * direction).flatten(-3).sum(-1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_vmap_and_per_sample_gradients(cpu_backend, cell):
    """vmap over samples (each its own sequence batch) and vmap(grad(...)) for per-sample gradients,
    as differential-privacy training computes them, against a loop."""
    torch.manual_seed(10)
    m = MODULES[cell](I, 4, image_size=V, dtype=torch.float64, backend=cpu_backend)
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(5, 6, 2, I, generator=g, dtype=torch.float64)  # 5 samples of [T=6, B=2, I]
    imgs = torch.randn(5, 2, V, generator=g, dtype=torch.float64)
    ys = torch.func.vmap(lambda x, v: m(x, image=v)[0])(xs, imgs)
    torch.testing.assert_close(ys, torch.stack([m(xs[i], image=imgs[i])[0] for i in range(5)]), atol=1e-12, rtol=1e-12)
    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p, x, v):
        return functional_call(m, p, (x,), {"image": v})[0].square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, xs, imgs)
    for i in range(5):
        want = torch.autograd.grad(loss(dict(m.named_parameters()), xs[i], imgs[i]), list(m.parameters()))
        for (name, got), w in zip(per_sample.items(), want):
            torch.testing.assert_close(got[i], w, atol=1e-12, rtol=1e-12, msg=lambda msg: f"{name}[{i}]: {msg}")


@pytest.mark.parametrize("cell", CELLS)
def test_custom_op_path_refuses_double_backward(cell):
    """The custom ops (what torch.compile traces) have a non-differentiable BPTT: a double backward
    through them is an error naming the eager path, never a silent constant."""
    if cell == "rnn":
        xp, w, h0, img, _ = rnn_inputs(4, 2, 5, "static", torch.float64)
        outs = torch.ops.mmrnn.rnn_fwd(xp, w, h0, img, None, "tanh", "reference")
    else:
        args, _ = gated_inputs(cell, 4, 2, 5, "static", torch.float64)
        outs = getattr(torch.ops.mmrnn, f"{cell}_fwd")(*args, None, "reference")
        xp = args[0]
    with pytest.raises(RuntimeError, match="double backward.*eager path is twice differentiable"):
        torch.autograd.grad(outs[0].sum(), xp, create_graph=True)
    g, = torch.autograd.grad(outs[0].sum(), xp)  # first order is fine
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("cell", CELLS)
def test_jacrev_matches_autograd_jacobian(cpu_backend, cell):
    """jacrev vmaps the backward: the differentiable BPTT serves it."""
    torch.manual_seed(4)
    m = MODULES[cell](I, 4, image_size=V, dtype=torch.float64, backend=cpu_backend)
    x, img = _inputs(T=4, B=2)
    f = lambda x: m(x, image=img, lengths=torch.tensor([4, 2]))[0]  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(f)(x), torch.autograd.functional.jacobian(f, x),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_second_order_matches_float64(cell):
    """On CUDA (Triton for the RNN, the reference backend for LSTM/GRU) in float32 with TF32 off, a
    gradient-penalty-style second-order pass agrees with float64 on the CPU."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(12)
        m64 = MODULES[cell](I, 16, num_layers=2, image_size=V, dtype=torch.float64)
        m32 = MODULES[cell](I, 16, num_layers=2, image_size=V).cuda()
        m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        x, img = _inputs(T=5, B=3, seed=13)
        results = []
        for m, dev, dt in ((m32, "cuda", torch.float32), (m64, "cpu", torch.float64)):
            xi = x.to(dev, dt).requires_grad_()
            out = m(xi, image=img.to(dev, dt), lengths=torch.tensor([5, 2, 4]))[0]
            g, = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
            results.append(torch.autograd.grad(g.square().sum(), [xi] + list(m.parameters())))
        for a, b in zip(*results):
            rel = ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()
            assert rel <= 1e-5, rel
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
