"""mmrnn-train and mmrnn-bench refuse what they cannot do right, with one clear line, before any work:
seeds that must all learn, --eval on the checkpoint's own test split, data errors naming file, line
and field, damaged checkpoints, missing optional dependencies, bad arguments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmrnn_ext import bench, data, train

QUICK = ["--quick", "--epochs", "30"]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def _rows(n=90, n_images=30, **fields):
    rows = [{"text": f"sample {'good' if i % 2 else 'bad'} text", "label": "pos" if i % 2 else "neg",
             "image_index": i % n_images} for i in range(n)]
    for r in rows:
        r.update(fields)
    return rows


def _features(tmp_path, n_images=30, width=6, name="f.npy"):
    np.save(tmp_path / name, np.random.default_rng(0).normal(size=(n_images, width)).astype(np.float32))
    return str(tmp_path / name)


def _load(tmp_path, rows, features=None):
    return data.load_user_data(_write_jsonl(tmp_path / "d.jsonl", rows), features or _features(tmp_path))


# --- 1. every seed learns ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 5])
def test_quick_budget_learns_on_seeds_that_stayed_at_chance(tmp_path, seed):
    """Seeds 1, 2 and 5 stayed at chance (0.51) with the --quick budget before the digit encoder
    standardised its pixels and normalised its output."""
    out = tmp_path / "m.json"
    assert train.main(["--quick", "--cell", "rnn", "--seed", str(seed), "--out", str(tmp_path / "r"), "--json",
                       str(out)]) == 0
    acc = json.loads(out.read_text())["add"]["test_accuracy"]
    print(f"seed {seed}: test accuracy {acc:.4f}")
    assert acc >= 0.95, acc


# (cell, fusion, seed) that ended at chance or below 0.95 with the --quick budget before early
# stopping waited for validation to leave the chance plateau and the classifier's encoder got
# orthogonal recurrent weights (issue 24; measured on the 2-core AMD EPYC, seeds 0-9:
# bench/results/train_seeds_diagnosis.json, "before").
PREVIOUSLY_FAILING = [("lstm", "add", 4), ("lstm", "add", 6), ("lstm", "concat", 1), ("lstm", "concat", 6),
                      ("lstm", "concat", 8), ("lstm", "init", 1), ("gru", "add", 2), ("gru", "add", 6),
                      ("gru", "add", 9), ("gru", "concat", 6), ("gru", "concat", 8), ("gru", "concat", 9),
                      ("gru", "init", 0), ("gru", "init", 1), ("gru", "init", 2), ("gru", "init", 3),
                      ("gru", "init", 7), ("gru", "init", 8), ("gru", "init", 9), ("rnn", "init", 0),
                      ("rnn", "init", 2), ("rnn", "init", 3), ("rnn", "init", 5), ("rnn", "init", 6),
                      ("rnn", "init", 9)]
# and those still under 0.95 with those two fixes, before the digit encoder's pixel noise: rnn init
# seed 9 (0.9354, the full ablation), gru init seed 7 (0.9493 under REPRODUCIBLE below; already
# listed), lstm init seed 7 (0.9488 with one thread).
ALSO = [("lstm", "init", 7)]

# A miss seen and gone: with the engine's weight gradients and the GRU's input product inside its
# tiles (2026-12-06, issue 33) the GRU's `init` seed 7 ended at 0.9456 under REPRODUCIBLE; with the
# BPTT's step sums and the GRU's one-pass weight gradients (later that day) it ends at 0.9682 (30
# epochs). The pinned trajectory moves with the kernels' rounding (the gradients agree with float64
# within float32's tolerance, tests/test_cpu_engine.py). A run listed here is expected to fail
# (strict: the day it passes, the mark must go).
KNOWN_MISSES: dict = {}


def _cases():
    for case in PREVIOUSLY_FAILING + ALSO:
        reason = KNOWN_MISSES.get(case)
        yield pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason=reason)) if reason else case


# A run's trajectory depends on every rounding, so these runs pin what differs between the CPUs CI
# draws (Intel and AMD, both AVX-512): MKL's code path (MKL_CBWR=COMPATIBLE: the same kernels on any
# x86), the engine's vector path and the thread count. The results are then the same on any of them
# (measured here under the same settings), not only on the CPU they were measured on.
REPRODUCIBLE = {"MKL_CBWR": "COMPATIBLE", "MMRNN_CPU_ISA": "avx512", "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
@pytest.mark.parametrize("cell,fusion,seed", list(_cases()))
def test_quick_budget_learns_every_cell_on_previously_failing_seeds(tmp_path, cell, fusion, seed):
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "mmrnn_ext.train", "--quick", "--cell", cell, "--fusion", fusion, "--seed", str(seed),
           "--out", str(tmp_path / "r"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **REPRODUCIBLE})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())[fusion]
    print(f"{cell} {fusion} seed {seed}: test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs")
    assert r["test_accuracy"] >= 0.95, r["test_accuracy"]


def test_early_stopping_waits_for_validation_to_leave_chance(monkeypatch):
    """A run whose validation stays at chance is not stopped after `patience` epochs, but after
    PLATEAU_PATIENCE x patience; once it has left the plateau, patience counts as before."""
    from mmrnn_ext.train import loop

    task = data.digits_task(seed=0)
    seen = []
    plateau = iter([0.5] * 100)
    monkeypatch.setattr(loop, "evaluate", lambda model, split, device, batch_size=1024: (
        seen.append(1) or {"accuracy": next(plateau), "loss": 0.69}))
    config = {"vocab_size": len(task.vocab), "num_classes": 2, "image_dim": 64, "embed_dim": 4, "hidden_size": 4,
              "num_layers": 1, "bidirectional": False, "dropout": 0.0, "fusion": "add", "cell": "rnn",
              "image_encoder": None, "backend": "auto", "seed": 0, "lr": 3e-3, "batch_size": 4096, "epochs": 40,
              "patience": 2}
    args = train.parse_args(["--max-steps", "0"])
    _, history, _ = loop.train(task, config, args, torch.device("cpu"), progress=False)
    assert len(history) == loop.PLATEAU_PATIENCE * 2
    left = iter([0.5, 0.5, 0.5, 0.8, 0.79, 0.79] + [0.5] * 100)
    monkeypatch.setattr(loop, "evaluate", lambda model, split, device, batch_size=1024: {"accuracy": next(left),
                                                                                        "loss": 0.5})
    _, history, _ = loop.train(task, config, args, torch.device("cpu"), progress=False)
    assert len(history) == 4 + 2  # left the plateau at epoch 4, then two epochs without a gain


def test_seeds_report_mean_and_minimum(tmp_path):
    out = tmp_path / "m.json"
    assert train.main(["--seeds", "3,4", "--max-steps", "3", "--epochs", "1", "--out", str(tmp_path / "r"),
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())["add"]
    per = [r["seeds"][s]["test_accuracy"] for s in ("3", "4")]
    assert r["test_accuracy"] == pytest.approx(sum(per) / 2) and r["test_accuracy_min"] == min(per)
    assert {p.name for p in (tmp_path / "r").glob("model*.pt")} == {"model_seed3.pt", "model_seed4.pt"}


def test_encoder_standardises_with_the_training_split():
    task = data.digits_task(0)
    from mmrnn_ext.models import DigitEncoder

    enc = DigitEncoder()
    enc.fit(task.train.images)
    z = (task.train.images - enc.pixel_mean) * enc.pixel_scale
    spread = task.train.images.std(0)
    assert torch.allclose(z.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(z.std(0)[spread > 0.05], torch.ones(int((spread > 0.05).sum())), atol=1e-4)


# --- 2. --eval scores the checkpoint's own test split -------------------------------------------

def test_eval_of_own_data_uses_the_checkpoint_seed_and_split(tmp_path, capsys):
    d, f = _write_jsonl(tmp_path / "d.jsonl", _rows()), _features(tmp_path)
    out, m = tmp_path / "r", tmp_path / "m.json"
    assert train.main(["--data", d, "--features", f, "--seed", "3", "--epochs", "3", "--out", str(out), "--json", str(m)]) == 0
    trained = json.loads(m.read_text())["add"]
    e = tmp_path / "e.json"
    assert train.main(["--eval", str(out / "model.pt"), "--data", d, "--features", f, "--json", str(e)]) == 0
    evaluated = json.loads(e.read_text())["add"]
    assert evaluated["seed"] == 3 and evaluated["confusion_matrix"] == trained["confusion_matrix"]
    with pytest.raises(SystemExit, match="seed 3"):
        train.main(["--eval", str(out / "model.pt"), "--data", d, "--features", f, "--seed", "0"])


def test_eval_of_the_builtin_task_uses_the_checkpoint_seed(tmp_path):
    out, m, e = tmp_path / "r", tmp_path / "m.json", tmp_path / "e.json"
    assert train.main(["--seed", "2", "--max-steps", "20", "--epochs", "1", "--out", str(out), "--json", str(m)]) == 0
    assert train.main(["--eval", str(out / "model.pt"), "--json", str(e)]) == 0
    assert json.loads(e.read_text())["add"]["confusion_matrix"] == json.loads(m.read_text())["add"]["confusion_matrix"]


def test_eval_refuses_other_data_and_missing_data(tmp_path):
    d, f = _write_jsonl(tmp_path / "d.jsonl", _rows()), _features(tmp_path)
    train.main(["--data", d, "--features", f, "--epochs", "1", "--out", str(tmp_path / "own")])
    ckpt = str(tmp_path / "own" / "model.pt")
    with pytest.raises(SystemExit, match="pass them with --data and --features"):
        train.main(["--eval", ckpt])
    other = _write_jsonl(tmp_path / "d2.jsonl", _rows(n=88))
    with pytest.raises(SystemExit, match="--data .*sha256 differs"):
        train.main(["--eval", ckpt, "--data", other, "--features", f])
    g = _features(tmp_path, width=6, name="g.npy")
    np.save(g, np.load(g) + 1)
    with pytest.raises(SystemExit, match="--features .*sha256 differs"):
        train.main(["--eval", ckpt, "--data", d, "--features", g])
    train.main(["--max-steps", "1", "--epochs", "1", "--out", str(tmp_path / "digits")])
    with pytest.raises(SystemExit, match="built-in task; drop --data"):
        train.main(["--eval", str(tmp_path / "digits" / "model.pt"), "--data", d, "--features", f])


# --- 3. data validation --------------------------------------------------------------------------

@pytest.mark.parametrize("bad, found", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_non_finite_features_are_refused_with_their_position(tmp_path, bad, found):
    feats = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    feats[17, 4] = bad
    np.save(tmp_path / "f.npy", feats)
    with pytest.raises(data.DataError, match=f"f.npy: 1 non-finite value.*row 17, column 4 is {found}"):
        _load(tmp_path, _rows(), str(tmp_path / "f.npy"))


def test_float64_features_beyond_float32_are_refused(tmp_path):
    feats = np.zeros((30, 6))
    feats[2, 1] = 1e300
    np.save(tmp_path / "f.npy", feats)
    with pytest.raises(data.DataError, match="row 2, column 1 .*beyond float32"):
        _load(tmp_path, _rows(), str(tmp_path / "f.npy"))


def test_cli_refuses_non_finite_features_before_training(tmp_path, capsys):
    feats = np.zeros((30, 6), dtype=np.float32)
    feats[0, 0] = np.nan
    np.save(tmp_path / "f.npy", feats)
    d = _write_jsonl(tmp_path / "d.jsonl", _rows())
    with pytest.raises(SystemExit, match="row 0, column 0 is nan"):
        train.main(["--data", d, "--features", str(tmp_path / "f.npy"), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "model.pt").exists()


@pytest.mark.parametrize("value, message", [
    ("abc", "line 4: field 'image_index' is 'abc'; expected a whole number"),
    (None, "line 4: field 'image_index' is null"),
    (3.7, "line 4: field 'image_index' is 3.7; expected a whole number \\(not fractional\\)"),
    (True, "line 4: field 'image_index' is True"),
    (-1, "line 4: field 'image_index' is -1, outside the 30 feature rows"),
    ([1], "line 4: field 'image_index' is \\[1\\]"),
])
def test_bad_image_index_names_file_line_and_field(tmp_path, value, message):
    rows = _rows()
    rows[3]["image_index"] = value
    with pytest.raises(data.DataError, match="d.jsonl " + message):
        _load(tmp_path, rows)


def test_whole_number_image_index_spellings_are_accepted(tmp_path):
    rows = _rows()
    rows[0]["image_index"], rows[1]["image_index"] = 3.0, " 7 "
    ds = _load(tmp_path, rows)
    ids = np.concatenate([ds.train.image_ids, ds.val.image_ids, ds.test.image_ids])
    assert 3 in ids and 7 in ids


@pytest.mark.parametrize("field, value, message", [
    ("text", None, "line 5: field 'text' is null; expected a string"),
    ("text", "   ", "line 5: field 'text' is empty"),
    ("text", 12, "line 5: field 'text' is a int"),
    ("label", None, "line 5: field 'label' is null"),
    ("label", "", "line 5: field 'label' is empty"),
    ("label", {"a": 1}, "line 5: field 'label' is a dict"),
])
def test_bad_text_or_label_names_file_line_and_field(tmp_path, field, value, message):
    rows = _rows()
    rows[4][field] = value
    with pytest.raises(data.DataError, match="d.jsonl " + message):
        _load(tmp_path, rows)


def test_line_numbers_count_blank_lines_and_bad_json(tmp_path):
    rows = [json.dumps(r) for r in _rows()]
    rows[6:6] = ["", "{not json"]
    with pytest.raises(data.DataError, match="d.jsonl line 8: not valid JSON"):
        _load(tmp_path, rows)
    rows[7] = '["a list"]'
    with pytest.raises(data.DataError, match="d.jsonl line 8: expected a JSON object"):
        _load(tmp_path, rows)


def test_missing_field_names_line(tmp_path):
    rows = _rows()
    del rows[9]["label"]
    with pytest.raises(data.DataError, match="d.jsonl line 10: no 'label' field"):
        _load(tmp_path, rows)


@pytest.mark.parametrize("a, b", [(1, 1.0), ("1", "1.0"), ("pos", "Pos"), (True, "True"), ("neg", "neg ")])
def test_labels_that_would_split_a_class_are_refused(tmp_path, a, b):
    rows = _rows()
    for i, r in enumerate(rows):
        r["label"] = a if i % 2 else "other"
    rows[11]["label"] = b
    with pytest.raises(data.DataError, match="would become two classes"):
        _load(tmp_path, rows)


def test_numeric_labels_written_one_way_are_one_class_each(tmp_path):
    rows = _rows()
    for i, r in enumerate(rows):
        r["label"] = i % 2 if i % 3 else str(i % 2)  # 1 and "1" are the same name: one class
    assert _load(tmp_path, rows).labels == ["0", "1"]


def test_split_column_accepts_common_spellings(tmp_path):
    rows = _rows()
    names = ["Train", "TRAIN", "training", "validation", "val", "Valid", "dev", "test", "Test", "testing"]
    for i, r in enumerate(rows):
        r["split"] = names[i % 10]
    ds = _load(tmp_path, rows)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (27, 36, 27)
    assert not ds.notes and ds.source["split"] == "column"


def test_split_column_without_val_holds_out_training_images_and_says_so(tmp_path):
    rows = _rows()
    for i, r in enumerate(rows):
        r["split"] = "test" if r["image_index"] >= 24 else "train"
    ds = _load(tmp_path, rows)
    assert len(ds.val) > 0 and len(ds.test) == 18
    assert not set(ds.val.image_ids) & set(ds.train.image_ids)
    assert len(ds.notes) == 1 and "held out as the validation split" in ds.notes[0]


@pytest.mark.parametrize("splits, message", [
    (["holdout"], "line 1: field 'split' is 'holdout'; expected train, val or test"),
    (["train"], "names no test records"),
    (["test"], "names no train records"),
    (["train", None], "line 2 has none"),
    (["train", 3], "field 'split' is 3"),
])
def test_bad_split_columns_are_refused_by_name(tmp_path, splits, message):
    rows = _rows()
    for i, r in enumerate(rows):
        r["split"] = splits[i % len(splits)]
    with pytest.raises(data.DataError, match=message):
        _load(tmp_path, rows)


def test_too_few_images_for_a_seeded_split(tmp_path):
    with pytest.raises(data.DataError, match="too few for a 70/15/15"):
        _load(tmp_path, _rows(n=10, n_images=3))


def test_csv_with_a_byte_order_mark_and_line_numbers(tmp_path):
    f = _features(tmp_path)
    lines = ["text,label,image_index"] + [f"word {i % 2},{'ab'[i % 2]},{i % 30}" for i in range(60)]
    (tmp_path / "d.csv").write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))
    ds = data.load_user_data(str(tmp_path / "d.csv"), f)
    assert ds.labels == ["a", "b"] and len(ds.train) + len(ds.val) + len(ds.test) == 60
    lines[7] = "word,a,seven"
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match="d.csv line 8: field 'image_index' is 'seven'"):
        data.load_user_data(str(tmp_path / "d.csv"), f)
    lines[7] = "word,a"
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match="d.csv line 8: no value for 'image_index'"):
        data.load_user_data(str(tmp_path / "d.csv"), f)


@pytest.mark.parametrize("kind", ["text", "npz", "pickle", "strings", "1d", "empty"])
def test_wrong_features_files_say_what_a_features_file_is(tmp_path, kind):
    path = tmp_path / "feats.npy"
    if kind == "text":
        path.write_text("0.1 0.2\n0.3 0.4\n")
    elif kind == "npz":
        np.savez(tmp_path / "feats.npz", x=np.zeros((30, 6)))
        path = tmp_path / "feats.npz"
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}] * 30, dtype=object), allow_pickle=True)
    elif kind == "strings":
        np.save(path, np.array([["a"] * 6] * 30))
    elif kind == "1d":
        np.save(path, np.zeros(30, dtype=np.float32))
    else:
        path.write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        _load(tmp_path, _rows(), str(path))
    text = str(err.value)
    assert "a features file must be one NumPy .npy array [num_images, F]" in text
    assert "allow_pickle" not in text and "unsafe" not in text.lower()


# --- 4. checkpoints that detect damage -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert train.main(["--max-steps", "30", "--epochs", "1", "--out", str(out)]) == 0
    return (out / "model.pt").read_bytes()


def _expect_refused(tmp_path, payload, match, capsys=None):
    path = tmp_path / "model.pt"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as err:
        train.load_checkpoint(str(path))
    message = str(err.value)
    assert "\n" not in message and "weights_only=False" not in message
    with pytest.raises(SystemExit, match=match):
        train.main(["--eval", str(path)])
    return message


def test_flipped_bytes_in_the_middle_are_detected(tmp_path, checkpoint):
    raw = bytearray(checkpoint)
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    _expect_refused(tmp_path, bytes(raw), "content digest mismatch|cannot be read")


def test_every_flipped_byte_of_the_weights_is_detected(tmp_path, checkpoint):
    """One byte flipped inside each stored tensor's data (found by its bytes in the file)."""
    state = torch.load(_write(tmp_path / "ok.pt", checkpoint), weights_only=True)["state_dict"]
    for name, t in state.items():
        blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        at = checkpoint.find(blob)
        assert at > 0, name
        raw = bytearray(checkpoint)
        raw[at + len(blob) // 2] ^= 0x01
        _expect_refused(tmp_path, bytes(raw), "content digest mismatch")


def _write(path, payload):
    path.write_bytes(payload)
    return str(path)


def test_empty_truncated_and_random_files(tmp_path, checkpoint):
    _expect_refused(tmp_path, b"", "the file is empty")
    _expect_refused(tmp_path, checkpoint[: len(checkpoint) // 2], "cannot be read: not a complete torch checkpoint")
    _expect_refused(tmp_path, np.random.default_rng(0).bytes(5000), "cannot be read")


def test_code_and_other_formats_are_refused(tmp_path):
    torch.save({"format": train.CHECKPOINT_FORMAT, "payload": os.system}, tmp_path / "code.pt")
    _expect_refused(tmp_path, (tmp_path / "code.pt").read_bytes(), "holds Python objects other than tensors")
    torch.save({"format": "mmrnn-train/1", "state_dict": {}}, tmp_path / "old.pt")
    _expect_refused(tmp_path, (tmp_path / "old.pt").read_bytes(), "written by an earlier mmrnn-train")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    _expect_refused(tmp_path, (tmp_path / "other.pt").read_bytes(), "expected format")


def test_edited_metadata_is_detected(tmp_path, checkpoint):
    ckpt = torch.load(_write(tmp_path / "ok.pt", checkpoint), weights_only=True)
    ckpt["labels"] = ["true", "false"]  # swapped: every prediction would be reported inverted
    torch.save(ckpt, tmp_path / "edited.pt")
    _expect_refused(tmp_path, (tmp_path / "edited.pt").read_bytes(), "content digest mismatch")


# --- 5. optional dependencies and output paths ---------------------------------------------------

def _without(modules, args, module="mmrnn_ext.train"):
    """Run a CLI in a fresh interpreter where importing `modules` fails as if not installed."""
    blocker = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {tuple(modules)!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, p=None: None if n.split('.')[0] in BLOCKED else _find(n, p)\n"
        f"import {module}, runpy\n"
        f"sys.argv = ['x'] + {list(args)!r}\n"
        f"sys.exit({module}.main())\n")
    return subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)


def test_help_works_with_the_core_install_alone():
    proc = _without(["numpy", "sklearn", "matplotlib", "tqdm", "captum"], ["--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fusion modes:" in proc.stdout and "(default: 64)" in proc.stdout


@pytest.mark.parametrize("blocked, args, names", [
    (["sklearn"], ["--quick"], "sklearn"),
    (["matplotlib"], ["--quick"], "matplotlib"),
    (["numpy", "sklearn"], ["--quick"], "numpy"),
    (["captum"], ["--quick", "--explain", "2"], "captum"),
])
def test_missing_train_extras_are_named_before_any_work(tmp_path, blocked, args, names):
    proc = _without(blocked, args + ["--out", str(tmp_path / "r")])
    assert proc.returncode == 1
    assert names in proc.stderr and 'pip install "mmrnn_ext[train]"' in proc.stderr, proc.stderr[-2000:]
    assert "test accuracy" not in proc.stdout and not (tmp_path / "r" / "model.pt").exists()


def test_bench_plot_without_matplotlib_fails_before_the_run(tmp_path):
    proc = _without(["matplotlib"], ["--shape", "1,1,1,1,1", "--device", "cpu", "--plot", str(tmp_path / "p.png")],
                    module="mmrnn_ext.bench")
    assert proc.returncode == 1 and 'pip install "mmrnn_ext[bench]"' in proc.stderr, proc.stderr[-2000:]
    assert "mmrnn-bench --cell" not in proc.stdout


@pytest.mark.parametrize("cli, argv", [
    (train.main, ["--json", "/nonexistent-dir/m.json"]),
    (bench.main, ["--json", "/nonexistent-dir/r.json", "--device", "cpu"]),
    (bench.main, ["--plot", "/nonexistent-dir/p.png", "--device", "cpu"]),
])
def test_unwritable_outputs_fail_before_the_run(cli, argv):
    with pytest.raises(SystemExit, match="/nonexistent-dir does not exist"):
        cli(argv)


def test_out_that_is_a_file_fails_before_the_run(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out .*cannot create it"):
        train.main(["--out", str(tmp_path / "file" / "sub")])


# --- 6. arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cli, flag, value", [
    (train.main, "--epochs", "0"), (train.main, "--patience", "0"), (train.main, "--batch-size", "0"),
    (train.main, "--hidden", "-3"), (train.main, "--lr", "0"), (train.main, "--dropout", "1.5"),
    (train.main, "--max-steps", "-1"), (train.main, "--seeds", "1,x"), (train.main, "--pixel-noise", "-0.5"),
    (train.main, "--pixel-noise", "nan"), (bench.main, "--repeats", "0"),
    (bench.main, "--layers", "0"),
])
def test_bad_argument_values_are_refused_by_name(cli, flag, value, capsys):
    with pytest.raises(SystemExit) as err:
        cli([flag, value])
    assert err.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
@pytest.mark.parametrize("cli", [train.main, bench.main])
def test_cuda_without_cuda_is_one_clear_line(cli):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible"):
        cli(["--device", "cuda"])


@pytest.mark.parametrize("cli", [train.main, bench.main])
def test_unknown_device_is_refused(cli):
    with pytest.raises(SystemExit, match="--device: expected cpu or cuda, got 'gpu0'"):
        cli(["--device", "gpu0"])


@pytest.mark.parametrize("argv, message", [
    (["--data", "d.jsonl"], "--data and --features go together"),
    (["--eval", "m.pt", "--ablate"], "--eval: not with --ablate"),
    (["--seed", "1", "--seeds", "1,2"], "--seeds: not with --seed"),
])
def test_inconsistent_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    assert message in capsys.readouterr().err


def test_missing_input_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--eval .*nope.pt: no such file"):
        train.main(["--eval", str(tmp_path / "nope.pt")])
    with pytest.raises(SystemExit, match="--data .*d.jsonl: no such file"):
        train.main(["--data", str(tmp_path / "d.jsonl"), "--features", str(tmp_path / "f.npy")])
