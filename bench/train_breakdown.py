"""Where a training step's milliseconds go: mmrnn_ext.LSTM, GRU or RNN (float32, CPU) at a shape, the
whole step (forward + backward, the input needing no gradient, as mmrnn-bench's training rows)
beside each of its parts timed alone on the same tensors:

    forward            the engine's training forward with the input product inside each step's
                       tile ([x_t | h_{t-1}] @ [W_ih; W_hh]), saving what BPTT reads (the module's
                       float32 step from batch 2 up)
    BPTT recurrence    the engine's reverse loop -> dG, and each row's dG summed over steps (the
                       image term's gradient; since 2026-12-06, one more pass over dG before)
    dW_ih and dW_hh    [dW_ih | dW_hh] = sum_t dG_t^T [x_t | h_{t-1}], one pass over dG on the engine
                       (the GRU's dW_hh n rows read d(W_hn h + b_hn) instead: the pass's tail; three
                       passes before 2026-12-06 09:30)
    image and bias     the image term with the outer biases (forward: image @ W_img^T + b_ih + b_hh)
                       and the image weight's and the biases' gradients from those sums (backward),
                       one engine call each (torch's ops before 2026-12-06 noon)
    rest               the step's best less the parts' bests: autograd, Python, allocation, the
                       gradient buffers, the final-state gathers

and, for comparison (not parts of the step; batch 1's forward is the first two):

    separate: input product       x @ W_ih^T over all steps on the engine's kernels
    separate: forward recurrence  the recurrence on that projected input
    torch: dW_ih                  dG^T x over all steps on torch's GEMM (the step's before 2026-12-06)
    torch: dW_hh                  sum_t dG_t^T h_{t-1} on torch's GEMM (likewise)

Each part and the step take turns (mmrnn-bench's side_by_side_stats: per round an untimed call,
then a timed one), so a slow spell of a shared machine spreads over all of them; a part's figure is
its best of `repeats` (its floor), shares are of the step's best.

    python bench/train_breakdown.py [--cell lstm|gru|rnn ...] [--shape B,T,I,V,H ...] [--repeats N] [--json PATH]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

import mmrnn_ext
from mmrnn_ext import _backends
from mmrnn_ext.bench import machine_info
from mmrnn_ext.bench.timing import side_by_side_stats
from mmrnn_ext.ops.common import weight_grad

SHAPES = [(32, 128, 128, 64, 256), (24, 100, 96, 64, 320)]


def parts(cell, B, T, I, V, H):
    """({name: callable} for the step and each of its parts, {name: GEMM FLOPs}, the module)."""
    torch.manual_seed(0)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell] * H
    ours = {"rnn": mmrnn_ext.RNN, "lstm": mmrnn_ext.LSTM, "gru": mmrnn_ext.GRU}[cell](I, H, image_size=V)
    x, v = torch.randn(T, B, I), torch.randn(B, V)
    be = _backends.select("cpp", x.device, x.dtype, cell)
    eng, mod = be.engine, be.engine._mod
    w_ih, w_hh = ours.weight_ih_l0.detach(), ours.weight_hh_l0.detach()
    w_img = ours.weight_img_l0.detach()
    h0 = torch.zeros(B, H)
    # the biases the module adds with the image term (the GRU's b_hn sits inside its reset product)
    bias = ours._outer_bias(ours._params(0, 0)).detach()
    b_hn = ours.bias_hh_l0.detach()[2 * H:]
    xp = F.linear(x, w_ih)
    img = F.linear(v, w_img, bias)
    if cell == "rnn":
        forward = lambda: eng.train_forward("rnn")(x, w_ih, w_hh, h0, img, None, False)  # noqa: E731
        out, _ = forward()
        ones = torch.ones_like(out)
        sums = torch.empty(B, G)
        bptt = lambda: mod.rnn_backward(ones, h0, out, h0, w_hh, None, False, sums)  # noqa: E731
        separate = lambda: mod.rnn_forward(xp, w_hh, h0, img, None, False)  # noqa: E731
        dA = bptt()[0]
    elif cell == "lstm":
        forward = lambda: eng.train_forward("lstm")(x, w_ih, w_hh, h0, h0, img, None)  # noqa: E731
        out, c_all, gates, _, _ = forward()
        ones = torch.ones_like(out)
        sums = torch.empty(B, G)
        bptt = lambda: mod.lstm_backward(ones, h0, h0, out, c_all, gates, h0, h0, w_hh, None, sums)  # noqa: E731
        separate = lambda: mod.lstm_forward(xp, w_hh, h0, h0, img, None)  # noqa: E731
        dA = bptt()[0]
    else:
        forward = lambda: eng.train_forward("gru")(x, w_ih, w_hh, b_hn, h0, img, None)  # noqa: E731
        out, gates, _ = forward()
        ones = torch.ones_like(out)
        sums = torch.empty(B, 4 * H)
        bptt = lambda: mod.gru_backward(ones, h0, out, gates, h0, w_hh, None, sums)  # noqa: E731
        separate = lambda: mod.gru_forward(xp, w_hh, b_hn, h0, img, None)  # noqa: E731
        dA, dhn, _ = bptt()

    def step():  # as mmrnn-bench's training rows: the output's gradient made once, outside the timing
        y, _ = ours(x, image=v)
        y.backward(ones)

    def weight_grads():  # the GRU's dW_hh reads d(W_hn h + b_hn) for its n rows: the pass's tail
        return eng.weight_grad(dA, x, h0, out, tail=dhn if cell == "gru" else None)

    b_ih, b_hh = ours.bias_ih_l0.detach(), ours.bias_hh_l0.detach()
    inner = H if cell == "gru" else 0

    def image_and_bias():  # the term, then its inputs' gradients from the BPTT's step sums
        return eng.outer_term(v, w_img, b_ih, b_hh, inner, B), eng.outer_grad(sums, v, inner, True)

    return {
        "step": step,
        "forward": forward,
        "separate: input product": lambda: eng.linear(x, w_ih),
        "separate: forward recurrence": separate,
        "BPTT recurrence": bptt,
        "dW_ih and dW_hh": weight_grads,
        "image and bias": image_and_bias,
        "torch: dW_ih": lambda: dA.flatten(0, 1).t().mm(x.flatten(0, 1)),
        "torch: dW_hh": lambda: weight_grad(dA, h0, out),
    }, {"forward": 2.0 * T * B * G * (I + H), "BPTT recurrence": 2.0 * T * B * G * H,
        "dW_ih and dW_hh": 2.0 * T * B * G * (I + H), "image and bias": 4.0 * B * V * G,
        "separate: input product": 2.0 * T * B * G * I, "separate: forward recurrence": 2.0 * T * B * G * H,
        "torch: dW_ih": 2.0 * T * B * G * I, "torch: dW_hh": 2.0 * T * B * G * H}, ours


def _in_step(name):
    """Whether a part is one of the step's (not the step itself, nor a comparison)."""
    return name != "step" and not name.startswith(("separate:", "torch:"))


def measure(cell, shape, repeats):
    fns, flops, _ = parts(cell, *shape)
    stats = side_by_side_stats(fns, torch.device("cpu"), repeats)
    named = sum(stats[k]["min_ms"] for k in fns if _in_step(k))
    rows = {k: {"ms_best": stats[k]["min_ms"], "ms_median": stats[k]["ms"],
                "gflops": flops[k] / stats[k]["min_ms"] / 1e6 if k in flops else None} for k in fns}
    # the step's best less its parts' bests (both floors); negative when the machine's noise exceeds it
    rows["rest"] = {"ms_best": rows["step"]["ms_best"] - named, "ms_median": None, "gflops": None}
    return {"cell": cell, "shape": list(shape), "parts": rows, "step_gemm_gflop": sum(f for k, f in flops.items() if _in_step(k)) / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=("rnn", "lstm", "gru"), action="append",
                    help="the cell (repeatable; default lstm)")
    ap.add_argument("--shape", action="append", help="B,T,I,V,H (repeatable)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    shapes = [tuple(int(s) for s in sh.split(",")) for sh in args.shape] if args.shape else SHAPES
    info = machine_info(torch.device("cpu"))
    print(f"{info['device']} ({info['cpu_vendor']}, engine ISA {info.get('engine_isa')}), {torch.get_num_threads()} threads")
    results = []
    for cell, shape in itertools.product(args.cell or ["lstm"], shapes):
        r = measure(cell, shape, args.repeats)
        results.append(r)
        step = r["parts"]["step"]
        print(f"\n{cell.upper()} {shape}: step median {step['ms_median']:.1f} ms, best {step['ms_best']:.1f} ms "
              f"({r['step_gemm_gflop']:.2f} GFLOP of GEMM)")
        for k, p in r["parts"].items():
            if k == "step":
                continue
            rate = "" if p["gflops"] is None else f"  {p['gflops']:.0f} GF/s"
            print(f"  {k:30s} {p['ms_best']:7.1f} ms  {100 * p['ms_best'] / step['ms_best']:4.0f}%{rate}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
