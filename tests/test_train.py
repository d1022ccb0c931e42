"""The multimodal classifier, its data and the mmrnn-train CLI."""
import json
import os

import numpy as np
import pytest
import torch

from mmrnn_ext import data, train

pytestmark = pytest.mark.slow  # runs mmrnn-train end to end: the quick lane leaves it out


@pytest.fixture(scope="module")
def task():
    return data.digits_task(seed=0)


def test_task_balance_per_template_and_digit(task):
    """For every statement template and every digit class, half the pairs are true."""
    from sklearn.datasets import load_digits

    digits = load_digits().target
    for split in (task.train, task.val, task.test):
        balance = data.template_balance(split, digits)
        assert len(balance) == len(data.TEMPLATES) * 10
        for (ti, d), (n_true, n) in balance.items():
            # labels alternate within each (template, digit): an odd count leaves one extra true
            assert 2 * n_true - n in (0, 1), (data.TEMPLATES[ti][0], d, n_true, n)


def test_splits_share_no_image(task):
    sets = [set(s.image_ids.tolist()) for s in (task.train, task.val, task.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_text_alone_is_near_chance(task):
    """The best text-only rule (each test text's majority label in training) stays near chance."""
    from collections import Counter, defaultdict

    stats = defaultdict(Counter)
    for t, y in zip(task.train.texts, task.train.labels.tolist()):
        stats[t][y] += 1
    hits = [(stats[t].most_common(1)[0][0] if t in stats else 1) == y
            for t, y in zip(task.test.texts, task.test.labels.tolist())]
    assert np.mean(hits) <= 0.6


def test_tokenizer_and_unknown_words():
    vocab = data.build_vocab(["The digit is SEVEN"])
    ids, lens = data.encode(["the digit is eleven", "seven"], vocab)
    assert vocab[:2] == [data.PAD, data.UNK]
    assert ids[0, 3].item() == 1 and lens.tolist() == [4, 1]
    with pytest.raises(ValueError, match="empty"):
        data.encode(["the digit", "   "], vocab)


def _args(**kw):
    return train.parse_args(sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), []))


def test_backend_parity_of_the_loss_curve(task):
    """The same seed trains to the same loss curve with the reference backend and the default one."""
    curves = []
    for backend in ("reference", "auto"):
        config = {"vocab_size": len(task.vocab), "num_classes": 2, "image_dim": 64, "embed_dim": 16, "hidden_size": 32,
                  "num_layers": 1, "bidirectional": True, "dropout": 0.0, "fusion": "add", "image_encoder": "digits",
                  "backend": backend, "seed": 0, "lr": 3e-3, "batch_size": 64, "epochs": 1, "patience": 1, "cell": "rnn"}
        _, _, steps = train.train(task, config, _args(max_steps=50), torch.device("cpu"), progress=False)
        curves.append(np.array(steps))
    assert len(curves[0]) == 50
    print(f"max |loss difference| over 50 steps: {np.abs(curves[0] - curves[1]).max():.2e}")
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4, atol=1e-5)


def test_digit_encoder_noise_is_for_training_only():
    from mmrnn_ext.models import DigitEncoder

    torch.manual_seed(0)
    enc = DigitEncoder(pixel_noise=0.5)
    pixels = torch.rand(7, 64)
    enc.eval()
    clean = enc(pixels)
    enc.pixel_noise = 0.0
    assert torch.equal(enc(pixels), clean)  # evaluation never adds noise
    enc.train()
    assert torch.equal(enc(pixels), clean)  # no noise asked: training sees the clean pixels
    enc.pixel_noise = 0.5
    noisy = enc(pixels)
    assert (noisy - clean).abs().max() > 1e-2


def test_pixel_noise_starts_after_the_chance_plateau(task):
    """The digit encoder trains without noise until validation has left the chance plateau, with
    config["pixel_noise"] from the next epoch on, and the model returned has it off."""
    config = {"vocab_size": len(task.vocab), "num_classes": 2, "image_dim": 64, "embed_dim": 32, "hidden_size": 64,
              "num_layers": 1, "bidirectional": False, "dropout": 0.0, "fusion": "add", "image_encoder": "digits",
              "backend": "auto", "seed": 0, "lr": 3e-3, "batch_size": 128, "epochs": 4, "patience": 5, "cell": "rnn",
              "pixel_noise": 0.5}
    model, history, _ = train.train(task, config, _args(), torch.device("cpu"), progress=False)
    chance = train.loop.chance_accuracy(task.val.labels)
    exit_at = chance + train.loop.PLATEAU_MARGIN * (1 - chance)
    left = next(i for i, h in enumerate(history) if h["val_accuracy"] >= exit_at)  # StopIteration: never left
    assert left < len(history) - 1, "the test needs an epoch after the plateau"
    assert [h["pixel_noise"] for h in history] == [0.0] * (left + 1) + [0.5] * (len(history) - left - 1)
    assert model.encoder.pixel_noise == 0.0


def test_cli_trains_saves_reloads_and_explains(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = tmp_path / "m.json"
    assert train.main(["--max-steps", "40", "--epochs", "1", "--explain", "1", "--out", str(out), "--json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert set(result) == {"add"}
    assert 0 <= result["add"]["test_accuracy"] <= 1 and len(result["add"]["confusion_matrix"]) == 2
    for name in ("model.pt", "curves.png", "confusion.png"):
        assert (out / name).stat().st_size > 0, name
    assert any(p.name.startswith("explain_") for p in out.iterdir())
    share = result["add"]["explanations"][0]["modality_share"]
    assert abs(share["text"] + share["image"] - 1) < 1e-6
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # no progress bar when stderr is not a terminal
    # the checkpoint round trip gives identical predictions
    model, config, vocab, labels, source = train.load_checkpoint(str(out / "model.pt"))
    assert source["kind"] == "digits" and source["seed"] == 0
    ds = data.digits_task(0)
    again = train.evaluate(model, ds.test, torch.device("cpu"))
    assert again["accuracy"] == result["add"]["test_accuracy"]
    assert train.main(["--eval", str(out / "model.pt"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["add"]["confusion_matrix"] == result["add"]["confusion_matrix"]


def test_ablation_json_keys(tmp_path):
    path = tmp_path / "a.json"
    assert train.main(["--ablate", "--max-steps", "5", "--epochs", "1", "--out", str(tmp_path / "r"), "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert set(result) == {"add", "concat", "init", "late", "text_only", "image_only"}
    assert all("test_accuracy" in v and "macro_f1" in v for v in result.values())


def _user_data(tmp_path, n_images=30, width=6, extra=None):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.normal(size=(n_images, width)).astype(np.float32))
    rows = [{"text": f"sample {'good' if i % 2 else 'bad'} text", "label": "pos" if i % 2 else "neg",
             "image_index": i % n_images} for i in range(90)]
    rows += extra or []
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(tmp_path / "d.jsonl"), str(tmp_path / "f.npy")


def test_user_data_trains_and_rejects_bad_records(tmp_path):
    d, f = _user_data(tmp_path)
    assert train.main(["--data", d, "--features", f, "--epochs", "2", "--out", str(tmp_path / "r"),
                       "--json", str(tmp_path / "m.json")]) == 0
    ds = data.load_user_data(d, f)
    assert ds.labels == ["neg", "pos"] and ds.image_dim == 6
    with pytest.raises(ValueError, match="field 'image_index' is 99, outside the 30 feature rows"):
        data.load_user_data(*_user_data(tmp_path, extra=[{"text": "x", "label": "pos", "image_index": 99}]))
    with pytest.raises(ValueError, match="empty"):
        data.load_user_data(*_user_data(tmp_path, extra=[{"text": " ", "label": "pos", "image_index": 0, "split": "train"}] ))


def test_torchrun_launches_distributed_training(tmp_path):
    """mmrnn-train under torchrun: 2 CPU processes (gloo), DistributedDataParallel."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "mmrnn_ext.train", "--max-steps", "6", "--epochs", "1", "--out", str(tmp_path / "r"),
           "--json", str(tmp_path / "m.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # rank 0 alone reports
    assert (tmp_path / "r" / "model.pt").exists() and json.loads((tmp_path / "m.json").read_text())["add"]


def test_help_names_each_default_once():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mmrnn_ext.train", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    cell = out[out.index("  --cell {"):out.index("  --gap")]
    assert cell.count("default") == 1 and "(default lstm:" in " ".join(cell.split()), cell
