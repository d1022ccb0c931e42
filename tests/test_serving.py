"""Serving on CPU: the bfloat16 recurrences of the C++ backend (every cell, forward, inference and
BPTT, every vector path forced on this machine: the bf16 dot instruction where the CPU has it and the
widening path everywhere) against the float64 reference on the same bf16 values; and the cells'
decoding step (csrc/cell_step.cpp) against torch's own cells, including weights changed in place
between calls."""
import pytest
import torch

import mmrnn_ext
from conftest import assert_close

from test_cpu_engine import ORDER, _cpp, _force  # noqa: F401  (_cpp: the autouse require("cpp"))

SIZES = [(5, 1, 7), (3, 13, 65), (4, 3, 33), (2, 12, 16)]  # (T, B, H): B = 1, over one tile, odd H
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
BF16_RTOL = 1e-2  # norm-wise relative error of a bf16 result against float64 on the same bf16 values


def _rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _recurrence(cell, backend, xp, w, h0, c0, b_hn, img, lens, nl):
    if cell == "rnn":
        out, h = mmrnn_ext.rnn_recurrence(xp, w, h0, img, lens, nl, backend)
        return out, h
    if cell == "lstm":
        return mmrnn_ext.lstm_recurrence(xp, w, h0, c0, img, lens, backend)
    return mmrnn_ext.gru_recurrence(xp, w, b_hn, h0, img, lens, backend)


def _bf16_inputs(cell, T, B, H, image, seed):
    g = torch.Generator().manual_seed(seed)
    G = GATES[cell]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).bfloat16()

    img = None if image is None else rnd(*((T, B, G * H) if image == "step" else (B, G * H)), scale=0.5)
    return dict(xp=rnd(T, B, G * H), w=rnd(G * H, H, scale=H ** -0.5), h0=rnd(B, H), c0=rnd(B, H) if cell == "lstm" else None,
                b_hn=rnd(H) if cell == "gru" else None, img=img,
                lens=torch.randint(0, T + 1, (B,), generator=g))


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T,B,H", SIZES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in SIZES])
def test_bfloat16_forward_and_bptt_every_path(monkeypatch, isa, cell, T, B, H):
    """The fused bf16 kernels (float32 accumulation and state) against float64 on the same bf16
    inputs: outputs, final states and every input's gradient; lengths with zeros and full rows;
    a per-step image (the static one is the autocast test's)."""
    _force(monkeypatch, isa)
    inputs = _bf16_inputs(cell, T, B, H, "step", seed=T * 100 + B * 10 + H)
    inputs["lens"][0] = T  # one full row
    names = [k for k in ("xp", "w", "h0", "c0", "b_hn", "img") if inputs[k] is not None]
    ours = {k: (v.clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref = {k: (v.double().requires_grad_(k in names) if k != "lens" and v is not None else v) for k, v in inputs.items()}
    args = ("xp", "w", "h0", "c0", "b_hn", "img", "lens")
    out = _recurrence(cell, "cpp", *(ours[k] for k in args), "tanh")
    expected = _recurrence(cell, "reference", *(ref[k] for k in args), "tanh")
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    for k, (a, e) in enumerate(zip(out, expected)):
        assert a.dtype == torch.bfloat16
        assert _rel(a, e) <= BF16_RTOL, f"output {k}: relative error {_rel(a, e):.2e}"
    sum((a.double() * w).sum() for a, w in zip(out, weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    for k in names:
        assert ours[k].grad is not None and ours[k].grad.dtype == torch.bfloat16, k
        assert _rel(ours[k].grad, ref[k].grad) <= BF16_RTOL, f"grad {k}: relative error {_rel(ours[k].grad, ref[k].grad):.2e}"
    with torch.no_grad():  # the inference forward: the same numbers as the training forward
        infer = _recurrence(cell, "cpp", *(inputs[k] for k in args), "tanh")
    for a, b in zip(infer, out):
        assert torch.equal(a, b.detach())


STREAMED_H = {"rnn": 1100, "lstm": 520, "gru": 600}  # bf16 W_hh of 2.2-2.4 MB: over 512 KB a thread on two


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bfloat16_streamed_weights_every_path(monkeypatch, isa, cell):
    """As above with weights over a thread's L2 on two threads and B = 13 (two row blocks on every
    path): the bf16 pair panels prefetched and walked in alternating directions (run_steps,
    csrc/engine.h)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        test_bfloat16_forward_and_bptt_every_path(monkeypatch, isa, cell, 3, 13, STREAMED_H[cell])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ["generic", "avx512", "avx512_bf16"])
def test_bfloat16_paths_agree(monkeypatch, isa):
    """The dot-instruction path and the widening paths compute the same products up to float32
    rounding: at B = 1 and an odd H their outputs agree to bf16's last bit or so."""
    inputs = _bf16_inputs("lstm", 6, 1, 65, None, seed=3)
    args = [inputs[k] for k in ("xp", "w", "h0", "c0", "b_hn", "img", "lens")]
    monkeypatch.setenv("MMRNN_CPU_ISA", "generic")
    with torch.no_grad():
        base = _recurrence("lstm", "cpp", *args, "tanh")
    _force(monkeypatch, isa)
    with torch.no_grad():
        other = _recurrence("lstm", "cpp", *args, "tanh")
    for a, b in zip(other, base):
        assert _rel(a, b) <= 2 ** -7


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_autocast_runs_the_fused_bfloat16_kernels(cell):
    """Under CPU autocast bf16 the recurrence is the cpp backend's (not the reference step loop), and
    the module matches its float32 self within bf16's tolerance, forward and every gradient."""
    assert mmrnn_ext.backend_for(torch.zeros(1, dtype=torch.bfloat16), "auto", cell) == "cpp"
    cls = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell]
    torch.manual_seed(0)
    m = cls(5, 33, num_layers=2, bidirectional=True, image_size=3)
    x, img = torch.randn(6, 4, 5), torch.randn(4, 3)
    lens = torch.tensor([6, 1, 0, 4])
    y32, _ = m(x, image=img, lengths=lens)
    g32 = torch.autograd.grad(y32.sum(), list(m.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x, image=img, lengths=lens)
    assert _rel(y.float(), y32) <= BF16_RTOL
    g = torch.autograd.grad(y.float().sum(), list(m.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), g, g32):
        assert a.dtype == torch.float32
        assert _rel(a, b) <= 2 * BF16_RTOL, f"{name}: {_rel(a, b):.2e}"  # two bf16 roundings per product


def test_bfloat16_module_on_the_cpp_backend():
    """A bf16 model (model.bfloat16()) runs on backend='cpp' too, forward and backward."""
    torch.manual_seed(1)
    m = mmrnn_ext.GRU(4, 17, image_size=2, backend="cpp")
    ref = mmrnn_ext.GRU(4, 17, image_size=2, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    m = m.bfloat16()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x, img = torch.randn(5, 3, 4).bfloat16(), torch.randn(3, 2).bfloat16()
    y, h = m(x, image=img)
    y_ref, h_ref = ref(x.double(), image=img.double())
    assert y.dtype == torch.bfloat16 and _rel(y, y_ref) <= BF16_RTOL
    y.float().sum().backward()
    y_ref.sum().backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, q.grad) <= BF16_RTOL, name


# --- decoding -------------------------------------------------------------------------------------

CELL_PAIRS = {"rnn": (mmrnn_ext.RNNCell, torch.nn.RNNCell), "rnn-relu": (mmrnn_ext.RNNCell, torch.nn.RNNCell),
              "lstm": (mmrnn_ext.LSTMCell, torch.nn.LSTMCell), "gru": (mmrnn_ext.GRUCell, torch.nn.GRUCell)}


def _cells(kind, I, H, V, bias, dtype):
    ours_cls, stock_cls = CELL_PAIRS[kind]
    kw = {"nonlinearity": "relu"} if kind == "rnn-relu" else {}
    ours = ours_cls(I, H, bias=bias, image_size=V, dtype=dtype, **kw)
    stock = stock_cls(I + (V or 0), H, bias=bias, dtype=dtype, **kw)
    _sync(ours, stock)
    return ours, stock


def _sync(ours, stock):
    with torch.no_grad():
        for name, p in stock.named_parameters():
            src = getattr(ours, name)
            if name == "weight_ih" and ours.weight_img is not None:
                src = torch.cat([src, ours.weight_img], dim=1)
            p.copy_(src)


def _state(kind, B, H, dtype, g):
    h = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)
    return (h, torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)) if kind == "lstm" else h


def _close(a, b, dtype, what):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert_close(x, y, dtype, what)


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("kind", list(CELL_PAIRS))
@pytest.mark.parametrize("B,I,V,H", [(1, 3, 2, 7), (3, 5, None, 65), (7, 17, 9, 33), (5, 1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_decoding_step_matches_torch_cells(monkeypatch, isa, kind, B, I, V, H, dtype):
    """One call of our cell = torch's cell on the concatenated input, every vector path, under
    no_grad and in inference_mode, hx given and not, with and without bias."""
    _force(monkeypatch, isa)
    g = torch.Generator().manual_seed(B * 1000 + I * 10 + H)
    for bias in (True, False):
        torch.manual_seed(B + H)
        ours, stock = _cells(kind, I, H, V, bias, dtype)
        x = torch.randn(B, I, generator=g, dtype=torch.float64).to(dtype)
        v = None if V is None else torch.randn(B, V, generator=g, dtype=torch.float64).to(dtype)
        xc = x if v is None else torch.cat([x, v], dim=1)
        hx = _state(kind.split("-")[0], B, H, dtype, g)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                _close(ours(x, hx, image=v), stock(xc, hx), dtype, f"{kind} bias={bias} {ctx.__name__}")
                _close(ours(x, image=v), stock(xc), dtype, f"{kind} bias={bias} hx=None")


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_decoding_sees_weights_changed_in_place(kind):
    """Nothing is cached between calls: a weight changed in place — by an optimizer-style update,
    through .data (which no version counter sees), or by load_state_dict — is used by the next call."""
    torch.manual_seed(0)
    ours, stock = _cells(kind, 6, 9, 4, True, torch.float32)
    x, v = torch.randn(2, 6), torch.randn(2, 4)
    xc = torch.cat([x, v], dim=1)
    hx = _state(kind, 2, 9, torch.float32, torch.Generator().manual_seed(1))  # nonzero: W_hh counts
    changes = [lambda: ours.weight_hh.mul_(0.5), lambda: ours.weight_ih.data.add_(0.25),
               lambda: ours.weight_img.data.neg_(), lambda: ours.bias_hh.data.fill_(0.1),
               lambda: ours.load_state_dict({k: t * 1.5 for k, t in ours.state_dict().items()})]
    with torch.no_grad():
        before = ours(x, hx, image=v)
        for change in changes:
            change()
            _sync(ours, stock)
            after = ours(x, hx, image=v)
            _close(after, stock(xc, hx), torch.float32, "after an in-place change")
            assert not torch.equal(after[0] if isinstance(after, tuple) else after,
                                   before[0] if isinstance(before, tuple) else before)
            before = after


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_decoding_bad_input_gets_the_cells_errors(kind):
    """The decoding path refuses what the checked path refuses, with the same InputError."""
    torch.manual_seed(0)
    ours, _ = _cells(kind, 6, 9, 4, True, torch.float32)
    x, v = torch.randn(2, 6), torch.randn(2, 4)
    bad_h = torch.zeros(3, 9)
    hx = (bad_h, torch.zeros(2, 9)) if kind == "lstm" else bad_h
    with torch.no_grad():
        with pytest.raises(mmrnn_ext.InputError, match="hx"):
            ours(x, hx, image=v)
        with pytest.raises(mmrnn_ext.InputError, match="image"):
            ours(x, image=torch.randn(2, 5))
        with pytest.raises(mmrnn_ext.InputError, match="input"):
            ours(torch.randn(2, 7), image=v)
        with pytest.raises(mmrnn_ext.InputError, match="dtype"):
            ours(x.double(), image=v.double())


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_cells_with_gradients_take_the_autograd_path(kind):
    """With grad mode on and parameters that require grad, the call is differentiable (the decoding
    kernel is never used there); its gradients equal torch's cell's."""
    torch.manual_seed(0)
    ours, stock = _cells(kind, 6, 9, 4, True, torch.float64)
    x, v = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    a, b = ours(x, image=v), stock(torch.cat([x, v], dim=1))
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    assert a.requires_grad
    assert_close(a, b, torch.float64, "output")
    ga = torch.autograd.grad(a.sum(), ours.weight_hh)[0]
    gb = torch.autograd.grad(b.sum(), stock.weight_hh)[0]
    assert_close(ga, gb, torch.float64, "dW_hh")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_module_one_step_with_carried_state(cell, batch_first):
    """The modules called with T = 1 and a carried state (decoding through the module) equal the
    reference backend step for step, two layers, bidirectional, per-step and static image."""
    cls = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell]
    torch.manual_seed(0)
    m = cls(5, 13, num_layers=2, bidirectional=True, image_size=3, batch_first=batch_first)
    ref = cls(5, 13, num_layers=2, bidirectional=True, image_size=3, batch_first=batch_first, backend="reference")
    ref.load_state_dict(m.state_dict())
    B = 3
    state = state_ref = None
    with torch.no_grad():
        for t in range(4):
            x = torch.randn(B, 1, 5) if batch_first else torch.randn(1, B, 5)
            img = torch.randn(B, 3) if t % 2 else (torch.randn(B, 1, 3) if batch_first else torch.randn(1, B, 3))
            y, state = m(x, state, image=img)
            y_ref, state_ref = ref(x, state_ref, image=img)
            assert_close(y, y_ref, torch.float32, f"step {t} output")
            for a, b in zip(state if isinstance(state, tuple) else (state,),
                            state_ref if isinstance(state_ref, tuple) else (state_ref,)):
                assert_close(a, b, torch.float32, f"step {t} state")


def _step_counter(monkeypatch):
    """Counts the decoding kernel's calls (the modules' one-step path)."""
    from mmrnn_ext import _C
    calls, real = [], _C.cell_step

    def counted(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(_C, "cell_step", counted)
    return calls


def _states(s):
    return s if isinstance(s, tuple) else (s,)


STEP_CASES = [  # (cell, kwargs, batched, image form, hx given)
    ("rnn", dict(nonlinearity="relu", bias=False), True, None, False),
    ("rnn", dict(num_layers=3, image_size=4), False, "static", True),
    ("lstm", dict(num_layers=2, image_size=4, batch_first=True), True, "step", True),
    ("lstm", dict(bidirectional=True), False, None, True),
    ("gru", dict(num_layers=2, bidirectional=True, image_size=4, batch_first=True), True, "static", False),
    ("gru", dict(image_size=4), False, "step", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_module_one_step_fast_path(case, dtype, monkeypatch):
    """A T = 1 call without gradients runs the decoding kernel once per layer and direction and
    equals the reference backend: unbatched or batched (batch_first), hx given or not, no / static /
    per-step image, relu, no bias, float64; h_n is its own tensor, not a view of the output."""
    cell, kwargs, batched, image, given = STEP_CASES[case]
    cls = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell]
    torch.manual_seed(case)
    m = cls(7, 9, dtype=dtype, **kwargs)
    ref = cls(7, 9, dtype=dtype, backend="reference", **kwargs)
    ref.load_state_dict(m.state_dict())
    LD = m.num_layers * (2 if m.bidirectional else 1)
    B, bf = 3, m.batch_first

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype)

    x = (rnd(B, 1, 7) if bf else rnd(1, B, 7)) if batched else rnd(1, 7)
    img = None
    if image == "static":
        img = rnd(B, 4) if batched else rnd(4)
    elif image == "step":
        img = (rnd(B, 1, 4) if bf else rnd(1, B, 4)) if batched else rnd(1, 4)
    hx = None
    if given:
        hx = tuple(rnd(LD, B, 9) if batched else rnd(LD, 9) for _ in range(m.STATES))
        hx = hx if m.STATES == 2 else hx[0]
    calls = _step_counter(monkeypatch)
    with torch.no_grad():
        y, state = m(x, hx, image=img)
    assert len(calls) == LD
    with torch.no_grad():
        y_ref, state_ref = ref(x, hx, image=img)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "output")
    for a, b in zip(_states(state), _states(state_ref)):
        assert a.shape == b.shape
        assert_close(a, b, dtype, "state")
        assert a.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_module_one_step_dropout_and_gradients(monkeypatch):
    """Dropout between layers in training mode draws the same mask as the sequence path (same seed);
    with gradients possible the call takes the differentiable path (no decoding kernel)."""
    torch.manual_seed(0)
    m = mmrnn_ext.GRU(5, 8, num_layers=3, dropout=0.5, image_size=2)
    ref = mmrnn_ext.GRU(5, 8, num_layers=3, dropout=0.5, image_size=2, backend="reference")
    ref.load_state_dict(m.state_dict())
    x, v, h = torch.randn(1, 4, 5), torch.randn(4, 2), torch.randn(3, 4, 8)
    calls = _step_counter(monkeypatch)
    with torch.no_grad():
        torch.manual_seed(1)
        y, hn = m(x, h, image=v)
        torch.manual_seed(1)
        y_ref, hn_ref = ref(x, h, image=v)
    assert len(calls) == 3
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(hn, hn_ref, torch.float32, "h_n")
    m.eval()
    y, _ = m(x, h, image=v)
    assert len(calls) == 3 and y.requires_grad


@pytest.mark.parametrize("bad, match", [
    (dict(hx=torch.randn(3, 4, 8)), r"hx: Expected hidden size \(2, 4, 8\)"),
    (dict(hx=torch.randn(2, 5, 8)), r"hx: Expected hidden size \(2, 4, 8\)"),
    (dict(hx=torch.randn(2, 4, 8, dtype=torch.float64)), "hx: expected dtype torch.float32"),
    (dict(hx=[torch.randn(2, 4, 8)]), "hx: expected a tensor, got list"),
    (dict(image=torch.randn(4, 3)), r"image: expected shape \(4, 2\)"),
    (dict(image=torch.randn(1, 5, 2)), r"image: expected shape \(4, 2\)"),
    (dict(input=torch.randn(1, 4, 6)), "input_size"),
    (dict(input=torch.randn(1, 4, 5, dtype=torch.float64)), "dtype"),
])
def test_module_one_step_bad_input(bad, match):
    """Bad input on the one-step path gets the checked path's error, naming the argument."""
    m = mmrnn_ext.RNN(5, 8, num_layers=2, image_size=2)
    args = dict(input=torch.randn(1, 4, 5), hx=torch.randn(2, 4, 8), image=torch.randn(4, 2))
    args.update(bad)
    with torch.no_grad(), pytest.raises(mmrnn_ext.InputError, match=match):
        m(args["input"], args["hx"], image=args["image"])
