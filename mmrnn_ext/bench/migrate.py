"""mmrnn-bench --migrate: existing torch models served before and after mmrnn_ext.convert.

    mmrnn-bench --migrate            the two models below, at their batch and at batch 1
    mmrnn-bench --migrate --quick    small sizes, few rounds

Two models a user already has, no image: a speech encoder (2-layer bidirectional nn.GRU over 80
filterbank features, a linear head on every frame) and a text classifier (nn.Embedding, 1-layer
nn.LSTM, a linear head on the last state). Each is deep-copied and the copy converted with
mmrnn_ext.convert (the same weights); both are served with torch.no_grad, float32, on CPU, taking
turns (cpu_turns: an untimed call, then a timed one, per round). The outputs are checked to agree
before anything is timed. x = torch's time / the converted model's (above 1: converted is faster).
"""
from __future__ import annotations

import copy
import statistics

import torch
from torch import nn

from ..convert import convert
from .cases import DisagreementError
from .report import paired_table
from .timing import NOISY_SPREAD, cpu_turns, spread

TOL = 1e-4  # float32, relative to the largest output: a 2-layer, 200-step recurrence reorders sums


class SpeechEncoder(nn.Module):
    """Frames [B, T, F] -> per-frame logits [B, T, classes] through a bidirectional GRU stack."""

    def __init__(self, features, hidden, layers, classes):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, frames):
        out, _ = self.rnn(frames)
        return self.head(out)


class TextClassifier(nn.Module):
    """Token ids [B, T] -> class logits [B, classes] from the LSTM's last state."""

    def __init__(self, vocab, embed, hidden, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        _, (h, _) = self.rnn(self.embed(tokens))
        return self.head(h[-1])


# (name, model factory, model arguments, input maker, batch sizes, steps)
MODELS = {
    "speech encoder: 2-layer bidirectional GRU": (SpeechEncoder, dict(features=80, hidden=256, layers=2, classes=40),
                                                  (16, 1), 200),
    "text classifier: 1-layer LSTM": (TextClassifier, dict(vocab=10000, embed=256, hidden=512, classes=2), (32, 1), 128),
}
QUICK_MODELS = {
    "speech encoder: 2-layer bidirectional GRU": (SpeechEncoder, dict(features=6, hidden=8, layers=2, classes=3),
                                                  (4, 1), 5),
    "text classifier: 1-layer LSTM": (TextClassifier, dict(vocab=50, embed=8, hidden=16, classes=2), (4, 1), 5),
}


def _input(factory, kw, B, T, g):
    if factory is SpeechEncoder:
        return torch.randn(B, T, kw["features"], generator=g)
    return torch.randint(0, kw["vocab"], (B, T), generator=g)


def migrate_rows(quick: bool, rounds: int, progress=None) -> list:
    rows = []
    for name, (factory, kw, batches, T) in (QUICK_MODELS if quick else MODELS).items():
        torch.manual_seed(0)
        stock = factory(**kw).eval()
        converted, report = convert(copy.deepcopy(stock))
        swapped = [f"{n}: {a} -> {b}" for n, a, b in report.converted]
        for B in batches:
            x = _input(factory, kw, B, T, torch.Generator().manual_seed(B))
            with torch.no_grad():
                a, b = converted(x), stock(x)
            err = (a - b).abs().max().item()
            if err > TOL * max(1.0, b.abs().max().item()):
                raise DisagreementError(f"--migrate: {name} at B={B}: the converted model's output differs from "
                                        f"torch's by {err:.3e}; refusing to report speeds")

            def served(model):
                def call():
                    with torch.no_grad():
                        model(x)
                return call

            turns = cpu_turns({"converted": served(converted), "torch": served(stock)}, rounds)
            o, s = [t * 1e3 for t in turns["converted"]], [t * 1e3 for t in turns["torch"]]
            worst = max(spread(o), spread(s))
            rows.append({"model": name, "B": B, "T": T, **{f"arg_{k}": v for k, v in kw.items()}, "swapped": swapped,
                         "converted_ms": statistics.median(o), "converted_min_ms": min(o),
                         "torch_ms": statistics.median(s), "torch_min_ms": min(s), "rounds": rounds,
                         "x": statistics.median(s) / statistics.median(o), "spread": worst,
                         "noisy": worst > NOISY_SPREAD})
            if progress:
                progress(f"{name} B={B}")
    return rows


def format_rows(rows: list) -> str:
    return paired_table(rows, (("model", 44, lambda r: r["model"]), ("B,T", 8, lambda r: f"{r['B']},{r['T']}")),
                        ("converted ms", "converted_ms", "converted_min_ms"), ("torch ms", "torch_ms", "torch_min_ms"), 2,
                        "torch's median / the converted model's (above 1: converted is faster)")
