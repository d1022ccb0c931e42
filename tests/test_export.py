"""Shipping: torch.onnx.export (run in ONNX Runtime), torch.export and AOTInductor with dynamic batch
and time, TorchScript's refusal, mmrnn-train --export and the ONNX example. Every export is checked
against eager at two shapes other than the export example."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.export import Dim

import mmrnn_ext
from mmrnn_ext import InputError

pytestmark = pytest.mark.slow  # exports and compiles models (ONNX, AOTInductor): the quick lane leaves it out

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXAMPLE = (3, 9)  # (batch, steps) the exports trace
SHAPES = [(5, 4), (2, 13)]  # the shapes they are checked at
TOL = 1e-5  # float32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Wrapped(torch.nn.Module):
    """A model that passes image= and lengths= (the ways users call the modules)."""

    def __init__(self, rnn, *, hx, image, lengths):
        super().__init__()
        self.rnn, self.hx, self.image, self.lengths = rnn, hx, image, lengths

    def forward(self, x, h0, c0, img, lengths):
        hx = None
        if self.hx:
            hx = (h0, c0) if isinstance(self.rnn, mmrnn_ext.LSTM) else h0
        out, h = self.rnn(x, hx, image=img if self.image else None, lengths=lengths if self.lengths else None)
        return (out,) + (tuple(h) if isinstance(h, tuple) else (h,))


def _inputs(m, B, T, image, gen):
    r = m.rnn
    D = 2 if r.bidirectional else 1
    x = torch.randn(B, T, r.input_size, generator=gen) if r.batch_first else torch.randn(T, B, r.input_size, generator=gen)
    h0 = torch.randn(r.num_layers * D, B, r.hidden_size, generator=gen)
    c0 = torch.randn(r.num_layers * D, B, r.hidden_size, generator=gen)
    V = r.image_size or 1
    if image == "step":
        img = torch.randn(*((B, T) if r.batch_first else (T, B)), V, generator=gen)
    else:
        img = torch.randn(B, V, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    return x, h0, c0, img, lengths


def _dynamic(m, image):
    B, T = Dim("B", min=1), Dim("T", min=1)
    bt = {0: B, 1: T} if m.rnn.batch_first else {0: T, 1: B}
    return (bt, {1: B}, {1: B}, bt if image == "step" else {0: B}, {0: B})


def _flat(out):
    return [t for t in torch.utils._pytree.tree_leaves(out)]


def _onnx_session(model, args, dynamic_shapes, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_ort(session, args):
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), [a for a in args if a is not None])}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _check(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape, (what, g.shape, w.shape)
        assert (g - w).abs().max().item() <= TOL, (what, (g - w).abs().max().item())


MODULE_CASES = [
    # (cell, kwargs, image: None | "static" | "step", hx given, lengths given)
    ("RNN", dict(num_layers=2, bidirectional=True, batch_first=True), "static", True, True),
    ("RNN", dict(nonlinearity="relu", batch_first=False), "step", False, True),
    ("RNN", dict(num_layers=1), None, True, False),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), "static", True, True),
    ("LSTM", dict(num_layers=2, batch_first=True), "step", True, False),
    ("LSTM", dict(bidirectional=True, bias=False), "step", False, True),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True), "static", True, True),
    ("GRU", dict(batch_first=False), "step", False, True),
    ("GRU", dict(num_layers=2, bidirectional=True), None, True, False),
]


def _build(cell, kwargs, image, hx, lengths, seed=0):
    torch.manual_seed(seed)
    rnn = getattr(mmrnn_ext, cell)(7, 11, image_size=6 if image else None, **kwargs)
    if cell == "GRU":  # b_hn away from zero, so that reset-before vs reset-after would show
        with torch.no_grad():
            for name, p in rnn.named_parameters():
                if name.startswith("bias_hh"):
                    p.add_(0.5)
    return Wrapped(rnn, hx=hx, image=image is not None, lengths=lengths).eval()


def _args_for(m, args):
    """The inputs the model reads (the others are passed as None and left out of the graph)."""
    x, h0, c0, img, lengths = args
    is_lstm = isinstance(m.rnn, mmrnn_ext.LSTM)
    return (x, h0 if m.hx else None, c0 if m.hx and is_lstm else None, img if m.image else None,
            lengths if m.lengths else None)


def _dyn_for(m, image, args):
    return tuple(d if a is not None else None for d, a in zip(_dynamic(m, image or "static"), args))


@pytest.mark.parametrize("cell,kwargs,image,hx,lengths", MODULE_CASES)
def test_onnx_module_runs_in_onnx_runtime_at_other_shapes(tmp_path, cell, kwargs, image, hx, lengths):
    m = _build(cell, kwargs, image, hx, lengths)
    gen = torch.Generator().manual_seed(1)
    args = _args_for(m, _inputs(m, *EXAMPLE, image, gen))
    session = _onnx_session(m, args, _dyn_for(m, image, args), tmp_path / "m.onnx")
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "m.onnx")).graph.node}
    assert cell in ops  # one native node per layer, not a loop of small ops
    for B, T in SHAPES:
        a = _args_for(m, _inputs(m, B, T, image, gen))
        with torch.no_grad():
            want = _flat(m(*a))
        _check(_run_ort(session, a), want, (cell, B, T))


def test_onnx_gru_keeps_reset_after(tmp_path):
    m = _build("GRU", dict(batch_first=True), "static", True, False)
    gen = torch.Generator().manual_seed(2)
    args = _args_for(m, _inputs(m, *EXAMPLE, "static", gen))
    _onnx_session(m, args, _dyn_for(m, "static", args), tmp_path / "g.onnx")
    node = next(n for n in __import__("onnx").load(str(tmp_path / "g.onnx")).graph.node if n.op_type == "GRU")
    assert {a.name: a.i for a in node.attribute}["linear_before_reset"] == 1


class CellStep(torch.nn.Module):
    """One cell step as a model: (x, h, image) -> the new states (an LSTMCell gets c = h / 2)."""

    def __init__(self, cell):
        super().__init__()
        self.c = cell

    def forward(self, x, h, img):
        out = self.c(x, (h, 0.5 * h) if isinstance(self.c, mmrnn_ext.LSTMCell) else h, image=img)
        return tuple(out) if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("cell", ["RNNCell", "LSTMCell", "GRUCell"])
def test_onnx_cells(tmp_path, cell):
    torch.manual_seed(3)
    c = getattr(mmrnn_ext, cell)(5, 8, image_size=3).eval()

    m = CellStep(c)
    gen = torch.Generator().manual_seed(4)
    make = lambda B: (torch.randn(B, 5, generator=gen), torch.randn(B, 8, generator=gen), torch.randn(B, 3, generator=gen))
    B = Dim("B", min=1)
    session = _onnx_session(m, make(3), ({0: B}, {0: B}, {0: B}), tmp_path / "c.onnx")
    for b in (1, 6):
        a = make(b)
        with torch.no_grad():
            want = list(m(*a))
        _check(_run_ort(session, a), want, (cell, b))


# --- refusals ----------------------------------------------------------------------------------------

def _cause_chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__


def _export_error(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            torch.onnx.export(model, args, dynamo=True, verbose=False, **kw)
    ours = [e for e in _cause_chain(info.value) if isinstance(e, InputError)]
    assert ours, f"no InputError behind {type(info.value).__name__}: {info.value}"
    return str(ours[0])


class _Plain(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def test_onnx_refuses_proj_size_by_name():
    msg = _export_error(_Plain(mmrnn_ext.LSTM(3, 4, proj_size=2, image_size=None)), (torch.randn(2, 3, 3),))
    assert "proj_size" in msg and "ONNX" in msg and "torch.export" in msg


def test_onnx_refuses_packed_input():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = mmrnn_ext.GRU(3, 4)

        def forward(self, x, lengths):
            return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    msg = _export_error(Packed(), (torch.randn(5, 2, 3), torch.tensor([5, 3])))
    assert "PackedSequence" in msg and "lengths=" in msg


def test_export_with_bad_input_gives_the_modules_error():
    """Input the module rejects: its own InputError (torch.export raises it as is; torch.onnx.export
    chains it behind its own, and the traceback shows ours first)."""
    m = _Plain(mmrnn_ext.LSTM(3, 4))
    with pytest.raises(InputError, match="input_size"):
        torch.export.export(m, (torch.randn(2, 3, 5),))
    assert "input_size" in _export_error(m, (torch.randn(2, 3, 5),))


def test_torchscript_refused_with_one_clear_error():
    for module in (mmrnn_ext.LSTM(3, 4), mmrnn_ext.GRUCell(3, 4), _Plain(mmrnn_ext.RNN(3, 4))):
        with pytest.raises(RuntimeError) as info:
            torch.jit.script(module)
        msg = str(info.value)
        assert "torch.jit.script" in msg and "torch.export" in msg and "torch.onnx.export" in msg


@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_refused_with_one_clear_error(grad):
    """torch.jit.trace cannot record the engine's kernels: a trace of a cell's fast step recorded an
    aten::empty and returned uninitialised memory. Every module and cell refuses (with and without
    gradients, one step or a sequence, inside a model) instead."""
    cases = [(mmrnn_ext.RNNCell(4, 3), (torch.randn(2, 4),)), (mmrnn_ext.LSTMCell(4, 3), (torch.randn(4),)),
             (mmrnn_ext.GRU(4, 3), (torch.randn(1, 2, 4),)), (mmrnn_ext.LSTM(4, 3), (torch.randn(5, 2, 4),)),
             (_Plain(mmrnn_ext.RNN(4, 3, image_size=2)), (torch.randn(3, 2, 4),))]
    for module, args in cases:
        with torch.set_grad_enabled(grad), pytest.raises(RuntimeError) as info:
            torch.jit.trace(module, args, check_trace=False)
        msg = str(info.value)
        assert "torch.jit.trace" in msg and "torch.export" in msg and "torch.onnx.export" in msg, msg


# --- torch.export and AOTInductor ------------------------------------------------------------------------

EXPORT_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), "step", True, True),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True), "static", True, True),
    ("RNN", dict(batch_first=False), "step", False, True),
    ("RNN", dict(num_layers=2, nonlinearity="relu"), None, True, False),
]


@pytest.mark.parametrize("cell,kwargs,image,hx,lengths", EXPORT_CASES)
def test_torch_export_dynamic_batch_and_time(cell, kwargs, image, hx, lengths):
    m = _build(cell, kwargs, image, hx, lengths)
    gen = torch.Generator().manual_seed(5)
    args = _args_for(m, _inputs(m, *EXAMPLE, image, gen))
    ep = torch.export.export(m, args, dynamic_shapes=_dyn_for(m, image, args))
    for B, T in SHAPES + [(1, 1)]:
        a = _args_for(m, _inputs(m, B, T, image, gen))
        with torch.no_grad():
            _check(_flat(ep.module()(*a)), _flat(m(*a)), (cell, B, T))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_aot_inductor_package_matches_eager(tmp_path, cell):
    m = _build(cell, dict(num_layers=2, bidirectional=True, batch_first=True), "step", True, True)
    gen = torch.Generator().manual_seed(6)
    args = _args_for(m, _inputs(m, *EXAMPLE, "step", gen))
    ep = torch.export.export(m, args, dynamic_shapes=_dyn_for(m, "step", args))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    package = torch._inductor.aoti_load_package(path)
    for B, T in SHAPES:
        a = _args_for(m, _inputs(m, B, T, "step", gen))
        with torch.no_grad():
            _check(_flat(package(*[t for t in a if t is not None])), _flat(m(*a)), (cell, B, T))


# --- mmrnn-train --export and the example ----------------------------------------------------------------

def test_train_export_writes_verified_onnx_and_pt2(exported):
    root, metrics = exported
    ex = metrics["export"]
    assert os.path.isfile(root / "ship" / "model.onnx") and os.path.isfile(root / "ship" / "model.pt2")
    assert ex["test_examples"] > 1000
    for name in ("onnx", "pt2"):
        assert ex[name]["max_abs_diff"] <= 1e-4
        assert ex[name]["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=2 / ex["test_examples"])
    assert ex["eager_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_exported_onnx_equals_the_checkpoint_on_new_text(exported):
    """The ONNX file classifies a text outside the test split as the checkpoint does in eager."""
    from mmrnn_ext import data, train

    root, _ = exported
    model, _, vocab, labels, _ = train.load_checkpoint(str(root / "run" / "model.pt"))
    session = ort.InferenceSession(str(root / "ship" / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = ["the digit is not at least four", "this is an even number", "the digit is zebra seven"]
    tokens, lengths = data.encode(texts, vocab)
    image = torch.rand(len(texts), 64)
    with torch.no_grad():
        want = model.eval()(tokens, lengths, image)
    got = session.run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy(), "image": image.numpy()})[0]
    assert (torch.from_numpy(got) - want).abs().max().item() <= 1e-5


def test_export_refused_when_an_export_disagrees(tmp_path, exported, monkeypatch, capsys):
    from mmrnn_ext import train
    from mmrnn_ext.train import deploy

    root, _ = exported
    monkeypatch.setattr(deploy, "TOLERANCE", -1.0)  # any difference counts as disagreement
    with pytest.raises(SystemExit) as info:
        train.main(["--eval", str(root / "run" / "model.pt"), "--export", str(tmp_path / "bad")])
    msg = str(info.value.code)
    assert "refused" in msg and "disagree" in msg and "\n" not in msg
    assert os.listdir(tmp_path / "bad") == []


def test_export_needs_eval(tmp_path, capsys):
    from mmrnn_ext import train

    with pytest.raises(SystemExit):
        train.parse_args(["--export", str(tmp_path)])
    assert "--export: only with --eval" in capsys.readouterr().err


def _example(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "classify_onnx.py"), *argv],
                          capture_output=True, text=True, timeout=120)


def test_example_script_classifies_a_pair(exported):
    root, _ = exported
    proc = _example(str(root / "ship" / "model.onnx"), "the digit is not seven", "--digit", "17")
    assert proc.returncode == 0, proc.stderr
    label, probs = proc.stdout.split("  ", 1)
    assert label in ("true", "false") and "true" in probs and "false" in probs


def test_example_script_names_the_expected_inputs_for_another_model(tmp_path):
    m = _build("GRU", dict(batch_first=True), "static", False, False)
    gen = torch.Generator().manual_seed(7)
    args = _args_for(m, _inputs(m, *EXAMPLE, "static", gen))
    _onnx_session(m, args, _dyn_for(m, "static", args), tmp_path / "other.onnx")
    proc = _example(str(tmp_path / "other.onnx"), "the digit is seven", "--digit", "0")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "\n" not in err and "['tokens', 'lengths', 'image']" in err


def test_onnx_unbatched_input(tmp_path):
    """An unbatched sequence ([T, I], image [V]) exports with a dynamic length."""
    torch.manual_seed(8)
    m = Wrapped(mmrnn_ext.LSTM(7, 11, num_layers=2, image_size=6), hx=False, image=True, lengths=False).eval()
    gen = torch.Generator().manual_seed(9)
    make = lambda T: (torch.randn(T, 7, generator=gen), None, None, torch.randn(6, generator=gen), None)
    session = _onnx_session(m, make(9), ({0: Dim("T", min=1)}, None, None, None, None), tmp_path / "u.onnx")
    for T in (4, 13):
        a = make(T)
        with torch.no_grad():
            want = _flat(m(*a))
        _check(_run_ort(session, a), want, ("unbatched", T))


@pytest.mark.parametrize("cell", ["RNNCell", "LSTMCell", "GRUCell"])
def test_torch_export_cells_dynamic_batch(cell):
    torch.manual_seed(10)
    c = getattr(mmrnn_ext, cell)(5, 8, image_size=3).eval()

    m = CellStep(c)
    gen = torch.Generator().manual_seed(11)
    make = lambda B: (torch.randn(B, 5, generator=gen), torch.randn(B, 8, generator=gen), torch.randn(B, 3, generator=gen))
    B = Dim("B", min=1)
    ep = torch.export.export(m, make(3), dynamic_shapes=({0: B}, {0: B}, {0: B}))
    for b in (1, 6):
        a = make(b)
        with torch.no_grad():
            _check(list(ep.module()(*a)), list(m(*a)), (cell, b))


def test_torchscript_based_onnx_exporter_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="dynamo=True"):
            torch.onnx.export(_Plain(mmrnn_ext.GRU(3, 4)), (torch.randn(2, 3, 3),), str(tmp_path / "x.onnx"),
                              dynamo=False)
