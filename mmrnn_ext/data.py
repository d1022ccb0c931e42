"""Data for the multimodal classifier: the built-in digits-and-statements task, users' own
JSONL/CSV + .npy features, and the whitespace tokenizer.

Built-in task: scikit-learn's 8x8 handwritten digits (they ship inside the package: no download)
paired with generated statements about the digit, labelled true/false:

    "the digit is seven"            "the digit is not seven"
    "the digit is at least four"    "the digit is not at least four"
    "the digit is smaller than six" "the digit is not smaller than six"
    "this is an even number"        "this is not an even number"

For every template and every digit class half the pairs are true, and the number in a statement
is drawn so that each statement text is as often true as false where the digit allows it; so
neither the text alone nor the image alone predicts the label, and negation and word order make
a sequence model necessary. Splits are by image: no image is shared across train/val/test.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import numpy as np
import torch

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PAD, UNK = "<pad>", "<unk>"


def _rule_is(d, n):
    return d == n


def _rule_at_least(d, n):
    return d >= n


def _rule_smaller(d, n):
    return d < n


def _rule_even(d, n):
    return (d % 2 == 0) == (n == "even")


# (template, the numbers or words it takes, rule(digit, n) -> bool, negated)
TEMPLATES = [
    ("the digit is {}", list(range(10)), _rule_is, False),
    ("the digit is not {}", list(range(10)), _rule_is, True),
    ("the digit is at least {}", list(range(11)), _rule_at_least, False),
    ("the digit is not at least {}", list(range(11)), _rule_at_least, True),
    ("the digit is smaller than {}", list(range(11)), _rule_smaller, False),
    ("the digit is not smaller than {}", list(range(11)), _rule_smaller, True),
    ("this is an {} number", ["even", "odd"], _rule_even, False),
    ("this is not an {} number", ["even", "odd"], _rule_even, True),
]


def _truth(template_index: int, digit: int, n) -> bool:
    _, _, rule, negated = TEMPLATES[template_index]
    return rule(digit, n) != negated


def _word(n) -> str:
    return NUMBER_WORDS[n] if isinstance(n, int) else n


@dataclass
class Split:
    """One split: token ids [N, L] (padded), lengths [N], image features [N, F], labels [N]."""
    tokens: torch.Tensor
    lengths: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    texts: list
    image_ids: np.ndarray
    raw_images: np.ndarray | None = None  # [N, 8, 8] for the built-in task (attribution plots)
    templates: np.ndarray | None = None  # template index per pair, for the built-in task

    def __len__(self):
        return len(self.labels)


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    vocab: list
    labels: list
    image_dim: int


def tokenize(text: str) -> list:
    """Lower-case whitespace tokenizer."""
    return text.lower().split()


def build_vocab(texts) -> list:
    words = sorted({w for t in texts for w in tokenize(t)})
    return [PAD, UNK] + words


def encode(texts, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [N, L] padded with 0, lengths [N]); unknown words map to <unk>."""
    index = {w: i for i, w in enumerate(vocab)}
    seqs = []
    for i, t in enumerate(texts):
        words = tokenize(t)
        if not words:
            raise ValueError(f"text #{i} is empty: every example needs at least one token")
        seqs.append([index.get(w, 1) for w in words])
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


def generate_statements(digits: np.ndarray, rng: np.random.Generator):
    """For each image index and each template, one statement; labels alternate within every
    (template, digit class), and n is drawn to keep each text's true/false counts level."""
    rows = []  # (image_index, template_index, n, label)
    for ti, (_, choices, _, _) in enumerate(TEMPLATES):
        counts = {n: [0, 0] for n in choices}  # running [false, true] counts per choice of n
        seen = np.zeros(10, dtype=np.int64)  # per digit class: pairs made so far (labels alternate)
        for i in rng.permutation(np.flatnonzero(digits >= 0)):
            d = int(digits[i])
            label = seen[d] % 2 == 0
            seen[d] += 1
            valid = [n for n in choices if _truth(ti, d, n) == label]
            # the n whose text so far leans most the other way; random among ties
            score = [counts[n][int(label)] - counts[n][int(not label)] for n in valid]
            best = [n for n, sc in zip(valid, score) if sc == min(score)]
            n = best[rng.integers(len(best))]
            counts[n][int(label)] += 1
            rows.append((int(i), ti, n, label))
    return rows


def _split_ids(n_images: int, rng: np.random.Generator, fractions=(0.7, 0.15)):
    perm = rng.permutation(n_images)
    a = int(fractions[0] * n_images)
    b = a + int(fractions[1] * n_images)
    return perm[:a], perm[a:b], perm[b:]


def digits_task(seed: int = 0) -> Dataset:
    """The built-in task. Image features: the 64 pixel intensities scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    digits = data.target
    rng = np.random.default_rng(seed)
    parts = _split_ids(len(digits), rng)
    splits = []
    for ids in parts:
        in_split = np.where(np.isin(np.arange(len(digits)), ids), digits, -1)  # -1: not in this split
        rows = generate_statements(in_split, rng)
        texts = [TEMPLATES[ti][0].format(_word(n)) for _, ti, n, _ in rows]
        splits.append((rows, texts))
    vocab = build_vocab(splits[0][1])
    out = []
    for rows, texts in splits:
        img_idx = np.array([r[0] for r in rows])
        tok, lens = encode(texts, vocab)
        out.append(Split(tok, lens, torch.from_numpy(images[img_idx].reshape(len(rows), -1)),
                         torch.tensor([int(r[3]) for r in rows]), texts, img_idx, images[img_idx],
                         np.array([r[1] for r in rows])))
    return Dataset(*out, vocab=vocab, labels=["false", "true"], image_dim=64)


def template_balance(split: Split, digits: np.ndarray) -> dict:
    """{(template index, digit): (pairs labelled true, pairs)} for a split of the built-in task."""
    result = {}
    split_digits = digits[split.image_ids]
    labels = split.labels.numpy()
    for ti in range(len(TEMPLATES)):
        for d in range(10):
            sel = (split.templates == ti) & (split_digits == d)
            if sel.any():
                result[(ti, d)] = (int(labels[sel].sum()), int(sel.sum()))
    return result


# --- users' own data ---------------------------------------------------------------------------

def _read_records(path: str) -> list:
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"data: expected a .jsonl or .csv file, got {path!r}")


def load_user_data(path: str, features_path: str, seed: int = 0, vocab=None, labels=None) -> Dataset:
    """Records with `text`, `label`, `image_index` (+ optional `split`: train/val/test; otherwise a
    seeded split by image); features: a .npy [num_images, F]. Vocabulary and label set come from the
    training split unless given (a checkpoint's)."""
    records = _read_records(path)
    feats = np.load(features_path, allow_pickle=False)
    if feats.ndim != 2:
        raise ValueError(f"features: expected a 2-D array [num_images, F] in {features_path}, got shape {feats.shape}")
    for i, r in enumerate(records):
        for key in ("text", "label", "image_index"):
            if key not in r:
                raise ValueError(f"{path}: record #{i} has no {key!r} field (fields: {sorted(r)})")
        idx = int(r["image_index"])
        if not 0 <= idx < len(feats):
            raise ValueError(f"{path}: record #{i} has image_index {idx}, outside the {len(feats)} feature rows of {features_path}")
    rng = np.random.default_rng(seed)
    if all("split" in r for r in records):
        groups = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    else:
        image_ids = sorted({int(r["image_index"]) for r in records})
        tr, va, te = _split_ids(len(image_ids), rng)
        which = {}
        for name, part in (("train", tr), ("val", va), ("test", te)):
            for k in part:
                which[image_ids[k]] = name
        groups = {s: [r for r in records if which[int(r["image_index"])] == s] for s in ("train", "val", "test")}
    if not groups["train"]:
        raise ValueError(f"{path}: no training records")
    vocab = vocab or build_vocab(r["text"] for r in groups["train"])
    labels = labels or sorted({str(r["label"]) for r in groups["train"]})
    label_index = {lab: i for i, lab in enumerate(labels)}
    splits = []
    for name in ("train", "val", "test"):
        recs = groups[name]
        unseen = sorted({str(r["label"]) for r in recs} - set(labels))
        if unseen:
            raise ValueError(f"{path}: {name} split has labels never seen in training: {unseen[:5]} (known: {labels[:10]})")
        texts = [str(r["text"]) for r in recs]
        if recs:
            tok, lens = encode(texts, vocab)
        else:
            tok, lens = torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        img_idx = np.array([int(r["image_index"]) for r in recs], dtype=np.int64)
        splits.append(Split(tok, lens, torch.from_numpy(feats[img_idx].astype(np.float32)),
                            torch.tensor([label_index[str(r["label"])] for r in recs], dtype=torch.long), texts, img_idx))
    return Dataset(*splits, vocab=vocab, labels=labels, image_dim=feats.shape[1])
