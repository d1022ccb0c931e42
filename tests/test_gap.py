"""The long-range variant of the built-in task (--gap), the classifier on every cell (--cell), the
curriculum and the gap sweep (--sweep-gaps), end to end on tiny budgets (not for accuracy)."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from mmrnn_ext import data, train
from mmrnn_ext.models import CELLS, FUSIONS, MultimodalClassifier

pytestmark = pytest.mark.slow  # trains the model end to end (cells x gaps x fusions): the quick lane leaves it out


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits().target


@pytest.mark.parametrize("gap", [0, 1, 7, 25])
def test_balance_per_template_and_digit_at_every_gap(digits, gap):
    task = data.digits_task(seed=1, gap=gap)
    for split in (task.train, task.val, task.test):
        balance = data.template_balance(split, digits)
        assert len(balance) == len(data.TEMPLATES) * 10
        for (ti, d), (n_true, n) in balance.items():
            assert 2 * n_true - n in (0, 1), (data.TEMPLATES[ti][0], d, n_true, n)


@pytest.mark.parametrize("gap", [1, 7, 25])
def test_gap_inserts_fillers_after_the_negation_and_changes_nothing_else(gap):
    base, long = data.digits_task(seed=2), data.digits_task(seed=2, gap=gap)
    for a, b in zip((base.train, base.val, base.test), (long.train, long.val, long.test)):
        assert torch.equal(a.labels, b.labels) and np.array_equal(a.image_ids, b.image_ids)
        assert np.array_equal(a.templates, b.templates)
        for short, text, ti in zip(a.texts, b.texts, a.templates):
            words, negated = text.split(), data.TEMPLATES[ti][3]
            at = words.index("is") + 1 + int(negated)
            fillers = words[at:at + gap]
            assert len(words) == len(short.split()) + gap and set(fillers) <= set(data.FILLERS)
            assert " ".join(words[:at] + words[at + gap:]) == short
            if negated:
                assert words[at - 1] == "not"
        assert int(b.lengths.max()) == int(a.lengths.max()) + gap


def test_fillers_carry_no_information_about_the_label():
    task = data.digits_task(seed=0, gap=25)
    counts = {True: Counter(), False: Counter()}
    for text, ti, y in zip(task.train.texts, task.train.templates, task.train.labels.tolist()):
        words = text.split()
        at = words.index("is") + 1 + int(data.TEMPLATES[ti][3])
        counts[bool(y)].update(words[at:at + 25])
    for w in data.FILLERS:
        share = counts[True][w] / (counts[True][w] + counts[False][w])
        assert abs(share - 0.5) < 0.02, (w, share)  # ~10k draws of each word: chance spread ~0.005


def test_gap_zero_is_the_original_task():
    a, b = data.digits_task(seed=3), data.digits_task(seed=3, gap=0)
    assert a.train.texts == b.train.texts and a.vocab == b.vocab and not set(data.FILLERS) & set(a.vocab)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_gap_is_refused(bad):
    with pytest.raises(ValueError, match="gap: expected an integer >= 0"):
        data.digits_task(0, bad)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_trains_with_every_cell(cell, fusion, digits):
    task = data.digits_task(0, gap=2)
    torch.manual_seed(0)
    model = MultimodalClassifier(len(task.vocab), 2, task.image_dim, fusion=fusion, image_encoder="digits", cell=cell,
                                 hidden_size=24, bidirectional=fusion in ("add", "init"),
                                 num_layers=2 if fusion in ("concat", "init") else 1)
    assert model.rnn is None if fusion == "image_only" else type(model.rnn) is CELLS[cell]
    batch = slice(0, 128)
    args = (task.train.tokens[batch], task.train.lengths[batch], task.train.images[batch])
    if fusion == "text_only":
        y = torch.tensor([int(" not " in t) for t in task.train.texts[batch]])
    else:
        y = torch.from_numpy(digits[task.train.image_ids[batch]] % 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = torch.nn.functional.cross_entropy(model(*args), y).item()
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(*args), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.8, (first, loss.item())


def test_lstm_init_fusion_sets_both_h0_and_c0():
    """fusion init on the LSTM: h0 = tanh(P_h v) and c0 = P_c v, every layer and direction."""
    torch.manual_seed(0)
    model = MultimodalClassifier(10, 2, 5, fusion="init", cell="lstm", hidden_size=4, num_layers=2, bidirectional=True)
    assert model.init_proj.out_features == 2 * 2 * 2 * 4
    seen = {}
    model.rnn.register_forward_pre_hook(lambda m, a, kw: seen.update(hx=a[1] if len(a) > 1 else kw.get("hx")),
                                        with_kwargs=True)
    tokens, lengths, image = torch.randint(1, 10, (3, 6)), torch.tensor([6, 2, 4]), torch.randn(3, 5)
    model(tokens, lengths, image)
    h0, c0 = seen["hx"]
    full = model.init_proj(image).view(3, 2, 4, 4).permute(1, 2, 0, 3)
    torch.testing.assert_close(h0, torch.tanh(full[0]))
    torch.testing.assert_close(c0, full[1])


def test_curriculum_stages():
    assert train.curriculum_gaps(0) == [] and train.curriculum_gaps(1) == [0]
    assert train.curriculum_gaps(100) == [0, 12, 25, 50] and train.curriculum_gaps(200) == [0, 25, 50, 100]


def test_curriculum_advances_on_validation_accuracy(tmp_path, monkeypatch):
    """With the threshold at 0 every epoch moves on: gaps 0, 2, 5, 10, then the target 20; the
    weights kept are scored on the target's validation split."""
    monkeypatch.setattr(train.loop, "CURRICULUM_ADVANCE", 0.0)
    out = tmp_path / "m.json"
    assert train.main(["--cell", "gru", "--gap", "20", "--max-steps", "0", "--epochs", "6", "--batch-size", "512",
                       "--hidden", "8", "--embed", "4", "--out", str(tmp_path / "r"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["add"]
    assert [h["gap"] for h in r["history"]] == [0, 2, 5, 10, 20, 20]
    assert all("stage_val_accuracy" in h for h in r["history"][:4]) and r["curriculum_reached"] == 20
    monkeypatch.setattr(train.loop, "CURRICULUM_ADVANCE", 1.01)  # never reached: training stays on gap 0
    assert train.main(["--gap", "20", "--epochs", "2", "--batch-size", "512", "--hidden", "8", "--embed", "4",
                       "--out", str(tmp_path / "r"), "--json", str(out)]) == 0
    assert [h["gap"] for h in json.loads(out.read_text())["add"]["history"]] == [0, 0]
    assert train.main(["--gap", "20", "--no-curriculum", "--epochs", "2", "--batch-size", "512", "--hidden", "8",
                       "--embed", "4", "--out", str(tmp_path / "r"), "--json", str(out)]) == 0
    assert [h["gap"] for h in json.loads(out.read_text())["add"]["history"]] == [20, 20]


@pytest.mark.parametrize("cell", list(CELLS))
def test_cli_cell_and_gap_end_to_end_with_checkpoint_round_trip(tmp_path, cell):
    out, m, e = tmp_path / "r", tmp_path / "m.json", tmp_path / "e.json"
    assert train.main(["--cell", cell, "--gap", "6", "--max-steps", "25", "--epochs", "2", "--explain", "1",
                       "--out", str(out), "--json", str(m)]) == 0
    trained = json.loads(m.read_text())["add"]
    assert trained["cell"] == cell and trained["gap"] == 6 and 0 <= trained["test_accuracy"] <= 1
    assert any(p.name.startswith("explain_") for p in out.iterdir())
    model, config, _, _, source = train.load_checkpoint(str(out / "model.pt"))
    assert config["cell"] == cell and config["gap"] == 6 and source["gap"] == 6 and type(model.rnn) is CELLS[cell]
    assert train.main(["--eval", str(out / "model.pt"), "--json", str(e)]) == 0
    evaluated = json.loads(e.read_text())["add"]
    assert (evaluated["cell"], evaluated["gap"]) == (cell, 6)
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]


def test_sweep_json_is_keyed_by_cell_and_gap_and_plots(tmp_path):
    j, p = tmp_path / "s.json", tmp_path / "s.png"
    assert train.main(["--sweep-gaps", "0,4", "--cells", "rnn,lstm", "--ablate", "--max-steps", "2", "--epochs", "1",
                       "--hidden", "8", "--out", str(tmp_path / "r"), "--json", str(j), "--plot", str(p)]) == 0
    r = json.loads(j.read_text())
    assert set(r) == {"rnn", "lstm", "text_only", "image_only"} and all(set(v) == {"0", "4"} for v in r.values())
    for key, per_gap in r.items():
        for gap, m in per_gap.items():
            assert {"test_accuracy", "macro_f1", "seconds"} <= set(m) and m["gap"] == int(gap)
    assert r["lstm"]["4"]["cell"] == "lstm" and r["text_only"]["0"]["fusion"] == "text_only"
    assert p.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--data", "d.jsonl", "--features", "f.npy", "--gap", "3"], "--gap: the built-in task's knob"),
    (["--data", "d.jsonl", "--features", "f.npy", "--pixel-noise", "0.5"], "--pixel-noise: the built-in task's digit encoder"),
    (["--cells", "rnn"], "--cells: only with --sweep-gaps"),
    (["--plot", "p.png"], "--plot: only with --sweep-gaps"),
    (["--sweep-gaps", "0,x"], "--sweep-gaps: expected comma-separated integers"),
    (["--sweep-gaps", "0,-5"], "--sweep-gaps: expected distinct integers >= 0"),
    (["--sweep-gaps", "0", "--cells", "rnn,cnn"], "--cells: expected distinct cells"),
    (["--sweep-gaps", "0", "--gap", "5"], "--sweep-gaps: not with --gap"),
    (["--cell", "transformer"], "argument --cell: invalid choice"),
])
def test_bad_gap_and_cell_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    assert message in capsys.readouterr().err
