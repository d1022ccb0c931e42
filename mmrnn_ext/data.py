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

The distance is a knob: with gap N, N filler words (drawn uniformly from FILLERS, which no template
uses, independently of everything else) stand right after "is" / "is not", so the negation is read
N steps before the rest of the statement that it flips:

    gap 3:  "the digit is not um so well at least four"   "this is okay hmm like an even number"

Labels, images and the balance per (template, digit) are those of gap 0; so is the text without
its fillers.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field

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


FILLERS = ("um", "well", "so", "like", "actually", "basically", "anyway", "okay", "hmm", "right", "see", "now")


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
    source: dict = field(default_factory=dict)  # what evaluation needs to rebuild the same splits
    notes: list = field(default_factory=list)  # what loading decided on the user's behalf (printed)


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


def reencode(ds: "Dataset", vocab: list) -> "Dataset":
    """Encode every split of `ds` with `vocab` (a checkpoint's, or another gap's) and adopt it."""
    for split in (ds.train, ds.val, ds.test):
        split.tokens, split.lengths = encode(split.texts, vocab)
    ds.vocab = vocab
    return ds


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


def with_gap(text: str, negated: bool, fillers) -> str:
    """The statement with `fillers` right after its "is" (after "is not" when negated)."""
    words = text.split()
    at = words.index("is") + 1 + int(negated)
    return " ".join(words[:at] + list(fillers) + words[at:])


def digits_task(seed: int = 0, gap: int = 0) -> Dataset:
    """The built-in task; `gap` filler words between the negation and the rest of each statement.
    Image features: the 64 pixel intensities scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap: expected an integer >= 0, got {gap!r}")

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
        if gap:
            fill = np.random.default_rng([seed, gap, len(splits)])  # its own stream: gap 0's draws are untouched
            texts = [with_gap(t, TEMPLATES[r[1]][3], fill.choice(FILLERS, size=gap)) for t, r in zip(texts, rows)]
        splits.append((rows, texts))
    vocab = build_vocab(splits[0][1])
    out = []
    for rows, texts in splits:
        img_idx = np.array([r[0] for r in rows])
        tok, lens = encode(texts, vocab)
        out.append(Split(tok, lens, torch.from_numpy(images[img_idx].reshape(len(rows), -1)),
                         torch.tensor([int(r[3]) for r in rows]), texts, img_idx, images[img_idx],
                         np.array([r[1] for r in rows])))
    return Dataset(*out, vocab=vocab, labels=["false", "true"], image_dim=64,
                   source={"kind": "digits", "seed": seed, "gap": gap})


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


def split_digest(split: Split) -> str:
    """sha256 over a split's texts, image indices and labels: which examples it holds, in order."""
    h = hashlib.sha256()
    for text, image, label in zip(split.texts, split.image_ids.tolist(), split.labels.tolist()):
        h.update(json.dumps([text, int(image), int(label)]).encode())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- users' own data ---------------------------------------------------------------------------

class DataError(ValueError):
    """Users' data that cannot be trained on as given: the message names the file, the line (or
    row) and the field, what was expected and what was found."""


FEATURES_FORMAT = ("a features file must be one NumPy .npy array [num_images, F] of finite numbers, "
                   "as written by numpy.save(path, array)")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
_EXTRA = "\0extra"  # csv.DictReader's key for values beyond the header
_INTEGER = re.compile(r"[+-]?\d+")


def load_features(path: str) -> np.ndarray:
    """-> float32 [num_images, F]; refuses archives, pickles, text, non-numeric or non-finite data."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DataError(f"features {path}: cannot be read ({exc.strerror})") from None
    if magic != b"\x93NUMPY":
        found = "a zip archive (.npz?)" if magic[:2] == b"PK" else "not a .npy file"
        raise DataError(f"features {path}: {found}; {FEATURES_FORMAT}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        found = "Python objects, not numbers" if "pickle" in str(exc) else "a damaged .npy file"
        raise DataError(f"features {path}: holds {found}; {FEATURES_FORMAT}") from None
    except (OSError, EOFError):
        raise DataError(f"features {path}: a truncated or damaged .npy file; {FEATURES_FORMAT}") from None
    if arr.dtype.kind not in "fiu":
        raise DataError(f"features {path}: dtype {arr.dtype}; {FEATURES_FORMAT}")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"features {path}: shape {arr.shape}; {FEATURES_FORMAT}")
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        what = "nan" if np.isnan(arr[r, c]) else ("inf" if np.isinf(arr[r, c]) else f"{arr[r, c]!r}, beyond float32")
        raise DataError(f"features {path}: {int(bad.sum())} non-finite value(s); the first: row {r}, column {c} is "
                        f"{what} (features must be finite)")
    return out


def _read_records(path: str) -> list:
    """-> [(line number, record dict)]: JSON Lines (one object per line) or CSV with a header."""
    if not path.endswith((".jsonl", ".csv")):
        raise DataError(f"data {path}: expected a .jsonl or .csv file")
    records = []
    try:
        with open(path, newline="" if path.endswith(".csv") else None, encoding="utf-8-sig") as f:
            if path.endswith(".jsonl"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path} line {n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                    if not isinstance(rec, dict):
                        raise DataError(f"{path} line {n}: expected a JSON object with text, label, image_index; "
                                        f"got a {type(rec).__name__}")
                    records.append((n, rec))
            else:
                reader = csv.DictReader(f, restkey=_EXTRA)
                if not reader.fieldnames:
                    raise DataError(f"{path}: empty CSV file (expected a header with text, label, image_index)")
                line = reader.line_num
                for rec in reader:
                    n, line = line + 1, reader.line_num
                    if _EXTRA in rec:
                        raise DataError(f"{path} line {n}: {len(rec[_EXTRA])} more value(s) than the header's "
                                        f"{len(reader.fieldnames)} columns")
                    missing = [k for k, v in rec.items() if v is None]
                    if missing:
                        raise DataError(f"{path} line {n}: no value for {missing[0]!r} (fewer values than the "
                                        "header has columns)")
                    records.append((n, rec))
    except OSError as exc:
        raise DataError(f"data {path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"data {path}: not UTF-8 text (byte {exc.start})") from None
    if not records:
        raise DataError(f"data {path}: no records")
    return records


def _text(where, value) -> str:
    if value is None:
        raise DataError(f"{where}: field 'text' is null; expected a string")
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'text' is a {type(value).__name__} ({value!r}); expected a string")
    if not tokenize(value):
        raise DataError(f"{where}: field 'text' is empty; every example needs at least one token")
    return value


def _image_index(where, value, n_rows: int, features_path: str) -> int:
    if value is None:
        raise DataError(f"{where}: field 'image_index' is null; expected a whole number")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: field 'image_index' is {value!r}; expected a whole number")
    if isinstance(value, str):
        if _INTEGER.fullmatch(value.strip()):
            value = int(value.strip())
        else:
            try:
                value = float(value)
            except ValueError:
                raise DataError(f"{where}: field 'image_index' is {value!r}; expected a whole number") from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value == int(value)):
            raise DataError(f"{where}: field 'image_index' is {value!r}; expected a whole number (not fractional)")
        value = int(value)
    if not 0 <= value < n_rows:
        raise DataError(f"{where}: field 'image_index' is {value}, outside the {n_rows} feature rows of {features_path}")
    return value


def _label(where, value) -> str:
    """-> the class name: strings as written, numbers as written in JSON, booleans as true/false."""
    if value is None:
        raise DataError(f"{where}: field 'label' is null")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{where}: field 'label' is {value!r}")
        return repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'label' is empty")
        return value
    raise DataError(f"{where}: field 'label' is a {type(value).__name__}; expected a string or a number")


def _label_key(name: str):
    """Names that would be the same class to a reader: 1 / 1.0 / "1", "Pos" / "pos ", true / "True"."""
    text = name.strip().casefold()
    try:
        return ("number", float(text))
    except ValueError:
        return ("text", text)


def _split(where, value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or value.strip().lower() not in SPLIT_NAMES:
        raise DataError(f"{where}: field 'split' is {value!r}; expected train, val or test (also accepted, any case: "
                        f"{', '.join(k for k in SPLIT_NAMES if k not in ('train', 'val', 'test'))})")
    return SPLIT_NAMES[value.strip().lower()]


def _validate(path: str, features_path: str, n_rows: int) -> list:
    """-> [{"line", "text", "label", "image_index", "split"}]; raises DataError at the first bad record."""
    out = []
    for n, rec in _read_records(path):
        where = f"{path} line {n}"
        for key in ("text", "label", "image_index"):
            if key not in rec:
                raise DataError(f"{where}: no {key!r} field (fields: {sorted(rec)})")
        out.append({"line": n, "text": _text(where, rec["text"]), "label": _label(where, rec["label"]),
                    "image_index": _image_index(where, rec["image_index"], n_rows, features_path),
                    "split": _split(where, rec.get("split"))})
    first = {}
    for r in out:
        k = _label_key(r["label"])
        if k in first and first[k]["label"] != r["label"]:
            raise DataError(f"{path}: labels {first[k]['label']!r} (line {first[k]['line']}) and {r['label']!r} (line "
                            f"{r['line']}) would become two classes; write each class the same way")
        first.setdefault(k, r)
    return out


def _assign_splits(path: str, records: list, seed: int, notes: list) -> tuple[dict, str]:
    """-> ({"train"|"val"|"test": records}, how): the split column when every record has one, else a
    seeded split by image. A split column without validation records: 15% of the training images
    (seeded) become the validation split, and a note says so."""
    given = [r for r in records if r["split"] is not None]
    rng = np.random.default_rng(seed)
    if given and len(given) != len(records):
        first = next(r for r in records if r["split"] is None)
        raise DataError(f"{path}: {len(given)} of {len(records)} records have a 'split' value, line {first['line']} "
                        "has none; give every record a split (train/val/test) or none")
    if given:
        groups = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
        for s in ("train", "test"):
            if not groups[s]:
                raise DataError(f"{path}: the 'split' column names no {s} records")
        if not groups["val"]:
            images = sorted({r["image_index"] for r in groups["train"]})
            if len(images) < 2:
                raise DataError(f"{path}: no val records, and the train records show only {len(images)} image(s): "
                                "too few to hold some out for validation; add val records")
            held = set(rng.permutation(images)[:max(1, int(0.15 * len(images)))].tolist())
            groups["val"] = [r for r in groups["train"] if r["image_index"] in held]
            groups["train"] = [r for r in groups["train"] if r["image_index"] not in held]
            notes.append(f"{path}: no val records: {len(held)} of the {len(images)} training images "
                         f"({len(groups['val'])} records, seed {seed}) are held out as the validation split")
            return groups, "column+val-from-train"
        return groups, "column"
    images = sorted({r["image_index"] for r in records})
    parts = _split_ids(len(images), rng)
    if not all(len(p) for p in parts):
        raise DataError(f"{path}: {len(images)} distinct images are too few for a 70/15/15 train/val/test split by "
                        "image; give at least 7 images or a 'split' column")
    which = {images[k]: name for name, part in zip(("train", "val", "test"), parts) for k in part}
    return {s: [r for r in records if which[r["image_index"]] == s] for s in ("train", "val", "test")}, "seeded"


def load_user_data(path: str, features_path: str, seed: int = 0, vocab=None, labels=None) -> Dataset:
    """Records with `text`, `label`, `image_index` (+ optional `split`: train/val/test, also val/valid/
    validation/dev, any case; otherwise a seeded 70/15/15 split by image); features: a .npy
    [num_images, F]. Every record and feature is checked before anything trains (DataError names the
    file, line and field). Vocabulary and label set come from the training split unless given (a
    checkpoint's)."""
    feats = load_features(features_path)
    records = _validate(path, features_path, len(feats))
    notes = []
    groups, how = _assign_splits(path, records, seed, notes)
    vocab = vocab or build_vocab(r["text"] for r in groups["train"])
    labels = labels or sorted({r["label"] for r in groups["train"]})
    label_index = {lab: i for i, lab in enumerate(labels)}
    splits = []
    for name in ("train", "val", "test"):
        recs = groups[name]
        unseen = [r for r in recs if r["label"] not in label_index]
        if unseen:
            raise DataError(f"{path} line {unseen[0]['line']}: label {unseen[0]['label']!r} ({name} split) was never "
                            f"seen in training (known: {labels[:10]})")
        texts = [r["text"] for r in recs]
        tok, lens = encode(texts, vocab)
        img_idx = np.array([r["image_index"] for r in recs], dtype=np.int64)
        splits.append(Split(tok, lens, torch.from_numpy(feats[img_idx]),
                            torch.tensor([label_index[r["label"]] for r in recs], dtype=torch.long), texts, img_idx))
    source = {"kind": "own", "seed": seed, "split": how, "data": path, "data_sha256": file_digest(path),
              "features": features_path, "features_sha256": file_digest(features_path)}
    return Dataset(*splits, vocab=vocab, labels=labels, image_dim=feats.shape[1], source=source, notes=notes)
