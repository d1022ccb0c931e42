"""mmrnn_ext.from_torch / .to_torch() / convert: torch's recurrent modules and cells to ours and back,
models trained on torch.cat([x, image]) split into input and image weights, whole models swapped in
place, and what cannot be converted refused or reported."""
import copy
import warnings

import pytest
import torch
from torch import nn

import mmrnn_ext
from mmrnn_ext import InputError

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (torch class, constructor kwargs) over every option the modules take; input_size 7, hidden 5
MODULE_CASES = [
    (nn.RNN, {}), (nn.RNN, dict(nonlinearity="relu", num_layers=2, bidirectional=True)),
    (nn.RNN, dict(bias=False, batch_first=True)),
    (nn.LSTM, {}), (nn.LSTM, dict(num_layers=2, bidirectional=True, dropout=0.25)),
    (nn.LSTM, dict(proj_size=3, num_layers=2, batch_first=True)), (nn.LSTM, dict(bias=False, bidirectional=True)),
    (nn.GRU, {}), (nn.GRU, dict(num_layers=3, bidirectional=True, batch_first=True)), (nn.GRU, dict(bias=False)),
]
CELL_CASES = [(nn.RNNCell, {}), (nn.RNNCell, dict(nonlinearity="relu", bias=False)), (nn.LSTMCell, {}),
              (nn.LSTMCell, dict(bias=False)), (nn.GRUCell, {}), (nn.GRUCell, dict(bias=False))]
I, H, B, T = 7, 5, 3, 4


def _ids(case):
    cls, kw = case
    return cls.__name__ + "".join(f"-{k}={v}" for k, v in kw.items())


def _inputs(stock, dtype, V, per_step, seed=0):
    """(x, image, the concatenated input torch's module takes, hx) for a module or cell whose input
    is I columns with the image last (V of them; V = 0: no image)."""
    g = torch.Generator().manual_seed(seed)
    cell = not hasattr(stock, "num_layers")
    if cell:
        x = torch.randn(B, I - V, generator=g, dtype=dtype)
        v = torch.randn(B, V, generator=g, dtype=dtype) if V else None
        xc = torch.cat([x, v], -1) if V else x
        h = torch.randn(B, H, generator=g, dtype=dtype)
        hx = (h, torch.randn(B, H, generator=g, dtype=dtype)) if isinstance(stock, nn.LSTMCell) else h
        return x, v, xc, hx
    bf = stock.batch_first
    shape = (B, T) if bf else (T, B)
    x = torch.randn(*shape, I - V, generator=g, dtype=dtype)
    v = None
    if V:
        v = torch.randn(*shape, V, generator=g, dtype=dtype) if per_step else torch.randn(B, V, generator=g, dtype=dtype)
    xc = x if not V else torch.cat([x, v if per_step else v.unsqueeze(1 if bf else 0).expand(*shape, V)], -1)
    return x, v, xc, None


def _flat(out):
    """Every tensor of a module's output, flattened to one list."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _loss(out):
    return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in _flat(out))


def _close(a, b, tol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.abs().max().item()), err


def _grads_match(ours, stock, V, start, tol):
    """Every gradient of ours equals torch's (the image columns of torch's first-layer weight_ih
    against weight_img)."""
    for name, p in stock.named_parameters():
        g = p.grad
        suffix = name[len("weight_ih"):]
        if name.startswith("weight_ih") and V and suffix in ("", "_l0", "_l0_reverse"):
            _close(getattr(ours, name).grad, torch.cat([g[:, :start], g[:, start + V:]], 1), tol)
            _close(getattr(ours, "weight_img" + suffix).grad, g[:, start:start + V], tol)
        else:
            _close(getattr(ours, name).grad, g, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("V", [0, 2], ids=["no-image", "image"])
@pytest.mark.parametrize("case", MODULE_CASES + CELL_CASES, ids=_ids)
def test_round_trip_and_same_function(case, V, dtype):
    cls, kw = case
    torch.manual_seed(1)
    stock = cls(I, H, **kw, dtype=dtype).eval()
    ours = mmrnn_ext.from_torch(stock, image_size=V or None)
    assert type(ours).__name__ == cls.__name__ and ours.input_size == I - V and ours.image_size == (V or None)
    assert not ours.training
    for name, p in stock.named_parameters():  # the same Parameter objects where the shapes agree
        if not (V and name in ("weight_ih", "weight_ih_l0", "weight_ih_l0_reverse")):
            assert getattr(ours, name) is p, name
    for per_step in ([False, True] if V and hasattr(stock, "num_layers") else [False]):
        x, v, xc, hx = _inputs(stock, dtype, V, per_step)
        out_s = stock(xc, hx)
        out_o = ours(x, hx, image=v) if V else ours(x, hx)
        for a, b in zip(_flat(out_o), _flat(out_s)):
            _close(a, b, TOL[dtype])
        stock.zero_grad(), ours.zero_grad()
        _loss(out_s).backward()
        s_grads = {n: p.grad.clone() for n, p in stock.named_parameters()}
        stock.zero_grad(), ours.zero_grad()
        _loss(ours(x, hx, image=v) if V else ours(x, hx)).backward()
        for n, p in stock.named_parameters():
            p.grad = s_grads[n]
        _grads_match(ours, stock, V, I - V, TOL[dtype])
    # back to torch: the same module type, arguments and parameters, exactly the same function
    back = ours.to_torch()
    assert type(back) is cls and not back.training
    assert dict(back.named_parameters()).keys() == dict(stock.named_parameters()).keys()
    for name, p in stock.named_parameters():
        q = getattr(back, name)
        assert q.dtype == dtype and torch.equal(q, p), name
        if not (V and name in ("weight_ih", "weight_ih_l0", "weight_ih_l0_reverse")):
            assert q is p
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size", "nonlinearity"):
        assert getattr(back, attr, None) == getattr(stock, attr, None), attr
    x, v, xc, hx = _inputs(stock, dtype, V, False, seed=3)
    grads = []
    for module in (back, stock):  # the same outputs and the same gradients, bit for bit
        xg = xc.clone().requires_grad_()
        out = module(xg, hx)
        params = [p for _, p in sorted(module.named_parameters())]
        grads.append((_flat(out), torch.autograd.grad(_loss(out), [xg] + params)))
    for a, b in zip(grads[0][0] + list(grads[0][1]), grads[1][0] + list(grads[1][1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTMCell], ids=lambda c: c.__name__)
def test_image_columns_not_last(cls, where):
    """image_start: the image columns anywhere in torch's input; the rest stay in order."""
    V, dtype = 3, torch.float64
    start = 0 if where == "first" else 2
    torch.manual_seed(2)
    stock = cls(I, H, dtype=dtype)
    ours = mmrnn_ext.from_torch(stock, image_size=V, image_start=start)
    x, v, _, hx = _inputs(stock, dtype, V, False)
    if cls is nn.GRU:
        ve = v.unsqueeze(0).expand(T, B, V)
    else:
        ve = v
    xc = torch.cat([x[..., :start], ve, x[..., start:]], -1)
    for a, b in zip(_flat(ours(x, hx, image=v)), _flat(stock(xc, hx))):
        _close(a, b, TOL[dtype])
    back = ours.to_torch(image_start=start)
    assert torch.equal(back.weight_ih if cls is nn.LSTMCell else back.weight_ih_l0,
                       stock.weight_ih if cls is nn.LSTMCell else stock.weight_ih_l0)


def test_upper_layers_start_without_image_and_train_it():
    """In a stack only the first layer saw the image: the layers above start with weight_img = 0
    (trainable); once it is nonzero, to_torch refuses (torch has no such module)."""
    stock = nn.LSTM(I, H, num_layers=2, bidirectional=True)
    ours = mmrnn_ext.from_torch(stock, image_size=2)
    for name in ("weight_img_l1", "weight_img_l1_reverse"):
        w = getattr(ours, name)
        assert w.requires_grad and torch.count_nonzero(w) == 0
    ours.to_torch()  # still torch's function
    with torch.no_grad():
        ours.weight_img_l1_reverse[0, 0] = 0.5
    with pytest.raises(InputError, match=r"to_torch: this LSTM's layer 1 sees the image \(weight_img_l1_reverse is "
                                         r"nonzero\).*no torch module computes this one"):
        ours.to_torch()


def test_requires_grad_and_training_mode_carried():
    stock = nn.GRU(I, H, num_layers=2).train()
    stock.weight_ih_l0.requires_grad_(False)
    stock.bias_hh_l1.requires_grad_(False)
    ours = mmrnn_ext.from_torch(stock, image_size=3)
    assert ours.training
    assert not ours.weight_ih_l0.requires_grad and not ours.weight_img_l0.requires_grad
    assert ours.weight_img_l1.requires_grad and not ours.bias_hh_l1.requires_grad
    back = ours.to_torch()
    assert back.training and not back.weight_ih_l0.requires_grad and not back.bias_hh_l1.requires_grad


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRUCell], ids=lambda c: c.__name__)
def test_optimizer_built_before_conversion_keeps_training(cls):
    """An optimizer built on torch's module before the conversion trains the converted one: a step
    gives the parameters an unconverted twin reaches."""
    torch.manual_seed(3)
    dtype = torch.float64
    stock = cls(I, H, dtype=dtype)
    twin = copy.deepcopy(stock)
    opt, opt_twin = (torch.optim.Adam(m.parameters(), lr=0.1) for m in (stock, twin))
    ours = mmrnn_ext.from_torch(stock)
    x, _, xc, hx = _inputs(stock, dtype, 0, False)
    for _ in range(2):
        for model, optimizer in ((ours, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            _loss(model(xc, hx)).backward()
            optimizer.step()
    for name, p in twin.named_parameters():
        assert getattr(ours, name) is getattr(stock, name)
        _close(getattr(ours, name), p, TOL[dtype])
        assert not torch.equal(p, copy.deepcopy(cls(I, H, dtype=dtype)).get_parameter(name))


def test_ours_to_torch_and_back():
    """ours -> torch -> ours is exact, image included (first layer only)."""
    ours = mmrnn_ext.GRU(4, H, num_layers=2, bidirectional=True, image_size=3, dtype=torch.float64)
    with torch.no_grad():
        ours.weight_img_l1.zero_(), ours.weight_img_l1_reverse.zero_()
    again = mmrnn_ext.from_torch(ours.to_torch(), image_size=3)
    for name, p in ours.named_parameters():
        assert torch.equal(getattr(again, name), p), name
    x, v = torch.randn(T, B, 4, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    for a, b in zip(_flat(again(x, image=v)), _flat(ours(x, image=v))):
        assert torch.equal(a, b)


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, I)
        self.encoder = nn.LSTM(I, H, batch_first=True)
        self.blocks = nn.ModuleList([nn.Sequential(nn.GRU(H, H, num_layers=2, bidirectional=True)),
                                     nn.Linear(2 * H, H)])
        self.heads = nn.ModuleDict({"cell": nn.RNNCell(H, H), "out": nn.Linear(H, 2)})

    def forward(self, tokens):
        out, _ = self.encoder(self.embed(tokens))
        out, _ = self.blocks[0](out.transpose(0, 1))
        h = self.heads["cell"](self.blocks[1](out[-1]))
        return self.heads["out"](h)


def test_convert_whole_model_in_place():
    torch.manual_seed(4)
    model = _Classifier()
    reference = copy.deepcopy(model)
    encoder_w = model.encoder.weight_hh_l0
    tokens = torch.randint(0, 20, (B, T))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        got, report = mmrnn_ext.convert(model)
    assert got is model
    assert isinstance(model.encoder, mmrnn_ext.LSTM) and model.encoder.weight_hh_l0 is encoder_w
    assert isinstance(model.blocks[0][0], mmrnn_ext.GRU) and isinstance(model.heads["cell"], mmrnn_ext.RNNCell)
    assert [(n, a, b) for n, a, b in report.converted] == [
        ("encoder", "torch.nn.LSTM", "mmrnn_ext.LSTM"), ("blocks.0.0", "torch.nn.GRU", "mmrnn_ext.GRU"),
        ("heads.cell", "torch.nn.RNNCell", "mmrnn_ext.RNNCell")]
    assert report.skipped == [] and "converted blocks.0.0: torch.nn.GRU -> mmrnn_ext.GRU" in str(report)
    _close(model(tokens), reference(tokens), 1e-5)


def test_convert_shared_module_once_and_root():
    shared = nn.GRU(I, H)
    model = nn.ModuleList([shared, nn.Sequential(shared)])
    _, report = mmrnn_ext.convert(model)
    assert model[0] is model[1][0] and isinstance(model[0], mmrnn_ext.GRU)
    assert [n for n, *_ in report.converted] == ["0"]
    root, report = mmrnn_ext.convert(nn.LSTMCell(I, H))
    assert isinstance(root, mmrnn_ext.LSTMCell) and "(the model itself)" in str(report)


class _OwnForward(nn.LSTM):
    def forward(self, input, hx=None):
        return super().forward(input * 2, hx)


def test_convert_reports_what_it_leaves():
    hooked = nn.GRU(I, H)
    hooked.register_forward_hook(lambda *a: None)
    model = nn.ModuleDict({"own": _OwnForward(I, H), "hooked": hooked, "meta": nn.RNN(I, H, device="meta"),
                           "int8": torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.LSTM(I, H)), {nn.LSTM})[0],
                           "ok": nn.GRUCell(I, H)})
    with pytest.warns(UserWarning, match="not converted own"):
        _, report = mmrnn_ext.convert(model)
    assert [n for n, *_ in report.converted] == ["ok"]
    why = {n: w for n, _, w in report.skipped}
    assert set(why) == {"own", "hooked", "meta", "int8"}
    assert "overrides forward of torch.nn.LSTM" in why["own"]
    assert "has hooks (forward_hooks" in why["hooked"]
    assert "parameters on meta in torch.float32" in why["meta"]
    assert "convert the float model before quantizing it" in why["int8"]
    assert type(model["own"]) is _OwnForward and type(model["hooked"]) is nn.GRU  # left as they were


def test_convert_nothing_to_convert_says_so():
    with pytest.warns(UserWarning, match="nothing to convert: no torch.nn.RNN, LSTM, GRU"):
        _, report = mmrnn_ext.convert(nn.Sequential(nn.Linear(2, 2)))
    assert report.converted == [] and report.skipped == []


@pytest.mark.parametrize("call, error, message", [
    (lambda: mmrnn_ext.from_torch(nn.Linear(3, 4)), TypeError, r"module: expected torch.nn.RNN, LSTM, GRU, RNNCell, "
     r"LSTMCell or GRUCell, got torch.nn.modules.linear.Linear"),
    (lambda: mmrnn_ext.from_torch("lstm"), TypeError, r"got str \(not an nn.Module\)"),
    (lambda: mmrnn_ext.from_torch(nn.LSTM(I, H), image_size=I), InputError,
     r"image_size: expected an int in \[1, 6\] \(the image columns among the module's input_size = 7.*got 7"),
    (lambda: mmrnn_ext.from_torch(nn.LSTM(I, H), image_size=0), InputError, r"image_size: .* got 0"),
    (lambda: mmrnn_ext.from_torch(nn.LSTM(I, H), image_size=2.0), InputError, r"image_size: .* got 2.0"),
    (lambda: mmrnn_ext.from_torch(nn.GRU(I, H), image_size=2, image_start=6), InputError,
     r"image_start: expected an int in \[0, 5\] .* got 6"),
    (lambda: mmrnn_ext.from_torch(nn.GRU(I, H), image_start=0), InputError, r"image_start: given \(0\) without image_size"),
    (lambda: mmrnn_ext.from_torch(nn.GRU(I, H, device="meta")), InputError,
     r"module: torch.nn.modules.rnn.GRU has parameters on meta in torch.float32; mmrnn_ext runs cpu, cuda tensors"),
    (lambda: mmrnn_ext.from_torch(nn.GRU(I, H).to(torch.complex64)), InputError, r"in torch.complex64; mmrnn_ext runs"),
    (lambda: mmrnn_ext.from_torch(_OwnForward(I, H)), InputError, r"overrides forward of torch.nn.LSTM"),
    (lambda: mmrnn_ext.convert([nn.LSTM(I, H)]), TypeError, r"model: expected an nn.Module, got list"),
    (lambda: mmrnn_ext.LSTM(I, H, image_size=2).to_torch(image_start=8), InputError,
     r"image_start: expected an int in \[0, 7\]"),
], ids=lambda v: None)
def test_bad_input_one_line(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_mixed_dtypes_refused():
    m = nn.GRU(I, H)
    m.bias_hh_l0 = nn.Parameter(m.bias_hh_l0.double())
    with pytest.raises(InputError, match=r"module: expected every parameter on one device and dtype, got cpu "
                                         r"float32, cpu float64"):
        mmrnn_ext.from_torch(m)


def test_parametrized_refused():
    m = nn.utils.parametrizations.weight_norm(nn.LSTM(I, H), name="weight_hh_l0")
    with pytest.raises(InputError, match="parametrized weights"):
        mmrnn_ext.from_torch(m)
