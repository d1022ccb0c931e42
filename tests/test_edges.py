"""The edges a new user hit: --explain on the baselines, --backend with --eval (a GPU-trained
checkpoint evaluated on a CPU), --backend checked up front, the --gap bound, training options given
with --eval, output dtypes under autocast as torch's modules return them, and two messages."""
import json

import pytest
import torch

import mmrnn_ext
from mmrnn_ext import _backends, train
from mmrnn_ext.ops import InputError


def _tiny(tmp_path, *extra, name="r"):
    """A checkpoint trained for a few steps (not to learn: to exist)."""
    out = tmp_path / name
    assert train.main(["--max-steps", "2", "--epochs", "1", "--hidden", "8", "--embed", "8", "--out", str(out),
                       *extra]) == 0
    return out / "model.pt"


@pytest.mark.parametrize("fusion,unused", [("text_only", "image"), ("image_only", "text")])
def test_explain_on_a_baseline_gives_the_unused_input_nothing(tmp_path, fusion, unused):
    out = tmp_path / "r.json"
    _tiny(tmp_path, "--fusion", fusion, "--explain", "1", "--json", str(out))
    expl = json.loads(out.read_text())[fusion]["explanations"]
    assert len(expl) == 1
    share = expl[0]["modality_share"]
    assert share[unused] == 0.0 and share["text" if unused == "image" else "image"] == pytest.approx(1.0)
    if unused == "text":
        assert all(v == 0.0 for v in expl[0]["token_attributions"].values())


def _as_if_trained_with(path, backend):
    """Rewrites a checkpoint's recorded backend (re-sealed with its content digest), as a checkpoint
    trained with --backend triton on a GPU records it."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"] = dict(ckpt["config"], backend=backend)
    meta = {k: ckpt[k] for k in ("format", "config", "vocab", "labels", "data")}
    ckpt["digest"] = train.content_digest(meta, ckpt["state_dict"])
    torch.save(ckpt, path)


def _no_triton_here(monkeypatch):
    """This process as a CPU machine without the Triton interpreter (the test session enables it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backends, "_cache", {})
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs Triton: the case is a CPU-only machine")


@pytest.mark.parametrize("backend", [None, "auto", "cpp", "reference"])
def test_gpu_trained_checkpoint_evaluates_on_a_cpu(tmp_path, monkeypatch, backend):
    ckpt = _tiny(tmp_path)
    _as_if_trained_with(ckpt, "triton")
    _no_triton_here(monkeypatch)
    if backend == "cpp" and not mmrnn_ext.backends()["cpp"]["available"]:
        pytest.skip("the C++ extension is not built")
    out = tmp_path / "e.json"
    assert train.main(["--eval", str(ckpt), "--json", str(out)] + ([] if backend is None else ["--backend", backend])) == 0
    result = json.loads(out.read_text())["add"]
    assert result["backend"] == (backend or "auto") and 0.0 <= result["test_accuracy"] <= 1.0


def test_unavailable_backend_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    _no_triton_here(monkeypatch)
    monkeypatch.setattr(train.sweeps, "_load_data", lambda *a, **k: pytest.fail("data loaded before the backend check"))
    with pytest.raises(SystemExit) as exc:
        train.main(["--backend", "triton", "--out", str(tmp_path / "r")])
    message = str(exc.value)
    assert message.startswith("mmrnn-train: --backend triton:") and "\n" not in message
    assert "cuda" in message.lower()


@pytest.mark.parametrize("gap", ["100000000000000000000", "1000000000", "100000", "1001", "-1"])
def test_gap_beyond_its_bound_is_refused_up_front(gap, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--gap", gap])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--gap" in err and "[0, 1000]" in err and "one token per gap step" in err and "Traceback" not in err


def test_sweep_gaps_beyond_the_bound_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--sweep-gaps", "0,5000"])
    assert "[0, 1000]" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--cell", "lstm"], ["--hidden", "32"], ["--fusion", "concat"], ["--epochs", "3"],
                                    ["--quick"], ["--lr", "0.01"], ["--embed", "16"], ["--cell", "rnn"],
                                    ["--pixel-noise", "0"]])
def test_training_options_with_eval_are_refused_by_name(tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--eval", str(tmp_path / "model.pt"), *option])
    assert exc.value.code == 2
    assert f"--eval: not with {option[0]}" in capsys.readouterr().err


def test_eval_at_another_gap_is_supported(tmp_path, capsys):
    ckpt = _tiny(tmp_path)
    own, other = tmp_path / "own.json", tmp_path / "gap.json"
    assert train.main(["--eval", str(ckpt), "--json", str(own)]) == 0
    assert train.main(["--eval", str(ckpt), "--gap", "4", "--json", str(other)]) == 0
    own_r, other_r = json.loads(own.read_text())["add"], json.loads(other.read_text())["add"]
    assert own_r["gap"] == 0 and other_r["gap"] == 4 and other_r["trained_gap"] == 0
    assert "evaluating at gap 4; the checkpoint was trained at gap 0" in capsys.readouterr().out
    # --gap 0 given explicitly for a gap-0 checkpoint: its own split, the same result
    again = tmp_path / "again.json"
    assert train.main(["--eval", str(ckpt), "--gap", "0", "--json", str(again)]) == 0
    assert json.loads(again.read_text())["add"]["test_accuracy"] == own_r["test_accuracy"]


# --- autocast: the dtypes torch's own modules return -------------------------------------------

MODULES = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {})]
CELLS = ["RNNCell", "LSTMCell", "GRUCell"]


def _dtypes(result):
    out, states = result
    return [out.dtype] + [s.dtype for s in (states if isinstance(states, tuple) else (states,))]


@pytest.mark.parametrize("name,kw", MODULES, ids=[n + "".join(f"-{k}" for k in kw) for n, kw in MODULES])
@pytest.mark.parametrize("hx", [False, True], ids=["no-hx", "hx"])
def test_autocast_dtypes_match_torch_modules(name, kw, hx):
    torch.manual_seed(0)
    ours = getattr(mmrnn_ext, name)(4, 6, num_layers=2, **kw)
    theirs = getattr(torch.nn, name)(4, 6, num_layers=2, **kw)
    x = torch.randn(5, 3, 4)
    h_size = kw.get("proj_size", 6)
    states = None
    if hx:
        h0 = torch.zeros(2, 3, h_size)
        states = (h0, torch.zeros(2, 3, 6)) if name == "LSTM" else h0
    with torch.autocast("cpu", torch.bfloat16):
        got = _dtypes(ours(x, states))
        try:
            want = _dtypes(theirs(x, states))
        except RuntimeError as exc:  # oneDNN has no bf16 LSTM for CPUs without AVX-512 (e.g. AMD Zen 1/2)
            if "primitive descriptor" not in str(exc) or name != "LSTM":
                raise
            want = [torch.bfloat16] * 3  # what torch's LSTM returns where oneDNN runs it (measured, AVX-512 CPUs)
    assert got == want


@pytest.mark.parametrize("name", CELLS)
def test_autocast_dtypes_match_torch_cells(name):
    torch.manual_seed(0)
    ours, theirs = getattr(mmrnn_ext, name)(4, 6), getattr(torch.nn, name)(4, 6)
    x = torch.randn(3, 4)
    as_list = lambda r: [t.dtype for t in (r if isinstance(r, tuple) else (r,))]  # noqa: E731
    with torch.autocast("cpu", torch.bfloat16):
        assert as_list(ours(x)) == as_list(theirs(x))


def test_autocast_full_precision_outputs_keep_the_low_precision_computation():
    """nn.GRU's outputs are float32 under autocast; ours too, from the bfloat16 recurrence: equal to
    our bfloat16 result cast, and within bfloat16 accuracy of float32."""
    torch.manual_seed(0)
    gru = mmrnn_ext.GRU(4, 6)
    x = torch.randn(5, 3, 4)
    with torch.autocast("cpu", torch.bfloat16):
        out, h = gru(x)
    ref, _ = gru(x)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max().item() < 2e-2


# --- messages ---------------------------------------------------------------------------------

def test_integer_input_says_to_convert_the_input_not_the_model():
    with pytest.raises(InputError) as exc:
        mmrnn_ext.LSTM(4, 6)(torch.ones(3, 2, 4, dtype=torch.int64))
    message = str(exc.value)
    assert "model.to(torch.int64)" not in message and "input.to(torch.float32)" in message


def test_cpp_backend_on_a_float16_module_is_an_input_error_saying_what_to_do():
    if not mmrnn_ext.backends()["cpp"]["available"]:
        pytest.skip("the C++ extension is not built")
    m = mmrnn_ext.LSTM(4, 6, backend="cpp").half()
    with pytest.raises(InputError) as exc:
        m(torch.ones(3, 2, 4, dtype=torch.float16))
    assert isinstance(exc.value, TypeError)  # code that caught the TypeError still does
    message = str(exc.value)
    assert "backend='auto'" in message and "float32" in message and "float16" in message
