"""mmrnn-bench --train-step: the cells with gradients, side by side with torch's cells.

    mmrnn-bench --train-step            every cell, the shapes below, and the attention decoder
    mmrnn-bench --train-step --quick    small shapes, few rounds

Three measurements, all float32 on CPU, torch's cell fed the input concatenated with the image
(prepared outside the timing, so torch's side pays nothing for it):
    forward+backward   one cell call with gradients, then backward (what a teacher-forced decoder
                       runs per step; gradients accumulate into the parameters as in training)
    forward (grad)     the same call with gradients enabled, no backward
    per-step image     the modules (mmrnn_ext.RNN / LSTM / GRU) with an image per step [T, B, V] against
                       torch's module on torch.cat([x, image], -1): inference (no_grad) and a training
                       step (forward + backward)
    decoder            one training step (forward + backward over 20 steps, the batch shrinking as
                       captions end) of the attention captioning decoder (mmrnn_ext.models.AttentionDecoder)
                       on mmrnn_ext.LSTMCell against the same decoder on nn.LSTMCell

Each round runs every provider in turn (an untimed call, then `calls` timed ones); the table gives the
median and minimum over the rounds and x = torch's time / ours (above 1: mmrnn_ext is faster).
Outputs and gradients are checked against torch's before anything is timed.
"""
from __future__ import annotations

import statistics

import torch

from .. import models
from .cases import CELL_MODULES, CELLS, DisagreementError
from .report import paired_table
from .timing import NOISY_SPREAD, cpu_turns, spread

# (B, I, V, H): the attention decoder's cell (context 2048), two mid-size steps, batch 1
TRAIN_STEP_SHAPES = [(32, 512, 2048, 512), (32, 256, 64, 256), (8, 128, 64, 256), (1, 128, 64, 256)]
QUICK_TRAIN_STEP_SHAPES = [(4, 16, 8, 32), (1, 8, 4, 16)]
# (B, T, I, V, H): the modules with a per-step image
STEP_IMAGE_SHAPES = [(32, 64, 128, 64, 256), (64, 128, 256, 128, 512)]
QUICK_STEP_IMAGE_SHAPES = [(4, 5, 6, 3, 8)]
# the decoder: batch, caption steps, regions, features, embed, hidden
DECODER = dict(B=32, steps=20, regions=196, features=2048, embed=512, hidden=512, vocab=1000)
QUICK_DECODER = dict(B=4, steps=5, regions=9, features=16, embed=8, hidden=16, vocab=50)
TOL = 1e-5  # float32, relative to the largest value compared


def _pair(cell: str, I: int, V: int, H: int):
    ours_cls, stock_cls = CELL_MODULES[cell]
    torch.manual_seed(0)
    ours, stock = ours_cls(I, H, image_size=V), stock_cls(I + V, H)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            p.copy_(torch.cat([ours.weight_ih, ours.weight_img], 1) if name == "weight_ih" else getattr(ours, name))
    return ours, stock


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOL * max(1.0, b.abs().max().item())) if a.numel() else True


def step_providers(cell: str, B: int, I: int, V: int, H: int) -> dict:
    """{(provider, pass): callable} for one cell step; raises DisagreementError when ours and
    torch's differ in the output or any gradient."""
    ours, stock = _pair(cell, I, V, H)
    g = torch.Generator().manual_seed(1)
    x, v, h = torch.randn(B, I, generator=g), torch.randn(B, V, generator=g), torch.randn(B, H, generator=g)
    xc = torch.cat([x, v], 1)
    hx = (h, torch.randn(B, H, generator=g)) if cell == "lstm" else h

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    run = {"mmrnn_ext": lambda: first(ours(x, hx, image=v)), "torch": lambda: first(stock(xc, hx))}
    out_o, out_s = run["mmrnn_ext"](), run["torch"]()
    out_o.square().sum().backward()
    out_s.square().sum().backward()
    checks = [("output", out_o, out_s), ("weight_hh grad", ours.weight_hh.grad, stock.weight_hh.grad),
              ("weight_ih grad", ours.weight_ih.grad, stock.weight_ih.grad[:, :I]),
              ("weight_img grad", ours.weight_img.grad, stock.weight_ih.grad[:, I:])]
    for what, a, b in checks:
        if not _close(a, b):
            raise DisagreementError(f"--train-step: {cell} cell at (B,I,V,H) = {(B, I, V, H)}: {what} differs from "
                                    f"torch's by {(a - b).abs().max().item():.3e}; refusing to report speeds")

    def train(fn):
        def step():
            fn().sum().backward()
        return step

    return {("mmrnn_ext", "forward+backward"): train(run["mmrnn_ext"]), ("torch", "forward+backward"): train(run["torch"]),
            ("mmrnn_ext", "forward (grad)"): run["mmrnn_ext"], ("torch", "forward (grad)"): run["torch"]}


def decoder_providers(B, steps, regions, features, embed, hidden, vocab) -> dict:
    """{provider: one training step (loss.backward()) of the attention decoder}; checked first."""
    torch.manual_seed(2)
    stock = models.AttentionDecoder(vocab, embed=embed, hidden=hidden, features=features,
                                    attention=min(512, hidden), cell="torch")
    ours = models.AttentionDecoder(vocab, embed=embed, hidden=hidden, features=features,
                                   attention=min(512, hidden), cell="mmrnn_ext").copy_from(stock)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(B, regions, features, generator=g)
    captions = torch.randint(0, vocab, (B, steps + 1), generator=g)
    lengths = torch.sort(torch.randint(1, steps + 1, (B,), generator=g), descending=True).values
    lengths[0] = steps
    losses = {}
    for name, model in (("mmrnn_ext", ours), ("torch", stock)):
        loss = model(feats, captions, lengths)
        loss.backward()
        losses[name] = loss.detach()
    grad_o, grad_s = ours.cell.weight_hh.grad, stock.cell.weight_hh.grad
    if not (_close(losses["mmrnn_ext"], losses["torch"]) and _close(grad_o, grad_s)):
        raise DisagreementError(f"--train-step: the attention decoder differs from torch's: loss {losses['mmrnn_ext']:.6f} "
                                f"vs {losses['torch']:.6f}; refusing to report speeds")

    def step_of(model):
        def step():
            model(feats, captions, lengths).backward()
        return step

    return {"mmrnn_ext": step_of(ours), "torch": step_of(stock)}


def step_image_providers(cell: str, B: int, T: int, I: int, V: int, H: int) -> dict:
    """{(provider, pass): callable}: the module with a per-step image against torch's on the
    concatenation; checked first."""
    ours_cls, stock_cls, _ = CELLS[cell]
    torch.manual_seed(4)
    ours, stock = ours_cls(I, H, image_size=V), stock_cls(I + V, H)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            p.copy_(torch.cat([ours.weight_ih_l0, ours.weight_img_l0], 1) if name == "weight_ih_l0"
                    else getattr(ours, name))
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(T, B, I, generator=g), torch.randn(T, B, V, generator=g)
    xc = torch.cat([x, v], -1)
    run = {"mmrnn_ext": lambda: ours(x, image=v)[0], "torch": lambda: stock(xc)[0]}
    with torch.no_grad():
        a, b = run["mmrnn_ext"](), run["torch"]()
    if not _close(a, b):
        raise DisagreementError(f"--train-step: {cell} module with a per-step image at {(B, T, I, V, H)} differs from "
                                f"torch's by {(a - b).abs().max().item():.3e}; refusing to report speeds")

    def inference(fn):
        def f():
            with torch.no_grad():
                fn()
        return f

    def train(fn):
        def f():
            fn().sum().backward()
        return f

    return {(k, "inference"): inference(f) for k, f in run.items()} | {(k, "training"): train(f) for k, f in run.items()}


def _timed(fns: dict, rounds: int, calls: int) -> dict:
    """{name: [us per call, one per round]} (providers taking turns, cpu_turns)."""
    def repeat(fn):
        def many():
            for _ in range(calls):
                fn()
        return many

    turns = cpu_turns({k: repeat(f) for k, f in fns.items()}, rounds)
    return {k: [t / calls * 1e6 for t in ts] for k, ts in turns.items()}


def _row(times: dict, ours_key, torch_key, **fields) -> dict:
    o, s = times[ours_key], times[torch_key]
    worst = max(spread(o), spread(s))
    return {**fields, "mmrnn_ext_us": statistics.median(o), "mmrnn_ext_min_us": min(o),
            "torch_us": statistics.median(s), "torch_min_us": min(s), "rounds": len(o),
            "x": statistics.median(s) / statistics.median(o), "x_of_minimums": min(s) / min(o),
            "spread": worst, "noisy": worst > NOISY_SPREAD}


def train_step_rows(quick: bool, rounds: int, progress=None) -> list:
    rows = []
    for cell in ("rnn", "lstm", "gru"):
        for B, I, V, H in (QUICK_TRAIN_STEP_SHAPES if quick else TRAIN_STEP_SHAPES):
            fns = step_providers(cell, B, I, V, H)
            flop = 2.0 * B * (I + V + H) * {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
            calls = max(1, min(20, int(2e8 / flop)))
            times = _timed(fns, rounds, calls)
            for pass_name in ("forward+backward", "forward (grad)"):
                rows.append(_row(times, ("mmrnn_ext", pass_name), ("torch", pass_name), kind="cell", cell=cell,
                                 B=B, I=I, V=V, H=H, pass_name=pass_name, calls_per_round=calls))
            if progress:
                progress(f"{cell} {(B, I, V, H)}")
    for cell in ("rnn", "lstm", "gru"):
        for B, T, I, V, H in (QUICK_STEP_IMAGE_SHAPES if quick else STEP_IMAGE_SHAPES):
            times = _timed(step_image_providers(cell, B, T, I, V, H), rounds, 1)
            for pass_name in ("inference", "training"):
                rows.append(_row(times, ("mmrnn_ext", pass_name), ("torch", pass_name), kind="per-step image",
                                 cell=cell, B=B, T=T, I=I, V=V, H=H, pass_name=pass_name))
    d = QUICK_DECODER if quick else DECODER
    times = _timed(decoder_providers(**d), rounds, 1)
    rows.append(_row(times, "mmrnn_ext", "torch", kind="decoder", cell="lstm", pass_name="training step", **d))
    return rows


def _what(r: dict) -> str:
    if r["kind"] == "cell":
        return f"{r['cell']} cell B,I,V,H={r['B']},{r['I']},{r['V']},{r['H']}"
    if r["kind"] == "per-step image":
        return f"{r['cell']} B,T,I,V,H={r['B']},{r['T']},{r['I']},{r['V']},{r['H']}"
    return f"attention decoder B={r['B']} steps={r['steps']}"


def format_rows(rows: list) -> str:
    return paired_table(rows, (("what", 38, _what), ("pass", 18, lambda r: r["pass_name"])),
                        ("mmrnn_ext us", "mmrnn_ext_us", "mmrnn_ext_min_us"), ("torch us", "torch_us", "torch_min_us"), 0,
                        "torch's median / ours (above 1: mmrnn_ext is faster)")
