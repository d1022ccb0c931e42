"""The GPU issue's tables from the JSONs that bench/gpu_check.sh writes:

    python3 bench/gpu_summary.py DIR [PREFIX]

DIR holds PREFIXbench_default.json, PREFIXbench_tf32_off.json and (optionally) PREFIXsweep.json, as
bench/gpu_check.sh writes them (PREFIX "" for the RNN, "lstm_" / "gru_" for the gated cells); the
committed RNN copies are bench/results/gpu_h100_*.json (PREFIX gpu_h100_). Prints three markdown
tables: every provider side by side (ms), the targets as ratios, and the kernels alone per step.

Targets: bf16 >= 5x PyTorch's bf16 nn.X (X the benchmark's cell) and >= 1.0x cuDNN fp16; fp32 >= 1.0x
cuDNN fp32 at the same TF32 setting; RNN at batch 1 (1,1024,64,64,256): <= 1.5 us per step, bf16
forward. Every cell as measured."""
import json
import os
import sys

OURS = "mmrnn_ext"
BATCH1 = (1, 1024, 64, 64, 256)


def load(directory: str, prefix: str = "") -> dict:
    def read(name):
        path = os.path.join(directory, prefix + name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)
    return {"default": read("bench_default.json"), "off": read("bench_tf32_off.json"), "sweep": read("sweep.json")}


def stock(data: dict) -> str:
    """The stock provider's name for the benchmark's cell (mmrnn_ext.bench.stock_name)."""
    return f"nn.{data['default'].get('cell', 'rnn').upper()}(concat)"


def _ms(result, shape, dtype, provider, pass_name):
    if result is None:
        return None
    for r in result["rows"]:
        if tuple(r["shape"]) == shape and r["dtype"] == dtype and r["provider"] == provider and r["pass"] == pass_name:
            return r["ms"]
    return None


def _fmt(v):
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _ratio(ours, theirs, target):
    if not ours or not theirs:
        return "n/a"
    x = theirs / ours
    return f"{x:.2f}x" + ("" if x >= target else " (missed)")


def header(data: dict) -> str:
    m = data["default"]["machine"]
    return (f"{m['device']}; torch {m['torch']}, triton {m.get('triton')}, cuDNN {m.get('cudnn')}; "
            f"{m['date'][:10]}; median ms of triton.testing.do_bench, all providers in one process")


def _cells(data: dict):
    """(shape, pass) for every benchmark row, in the order they ran."""
    for shape in dict.fromkeys(tuple(r["shape"]) for r in data["default"]["rows"]):
        for p in ("forward", "forward+backward"):
            yield shape, p


def side_by_side(data: dict) -> str:
    d, off, st = data["default"], data["off"], stock(data)
    lines = ["| shape (B,T,I,V,H) | pass | cuDNN fp32 (TF32 default) | ours fp32 (TF32 default) | cuDNN fp32 (TF32 off) "
             "| ours fp32 (TF32 off) | cuDNN fp16 | ours fp16 | PyTorch bf16 | ours bf16 | eager loop fp32 |",
             "|" + " --- |" * 11]
    for shape, p in _cells(data):
        cells = [_ms(d, shape, "float32", st, p), _ms(d, shape, "float32", OURS, p),
                 _ms(off, shape, "float32", st, p), _ms(off, shape, "float32", OURS, p),
                 _ms(d, shape, "float16", st, p), _ms(d, shape, "float16", OURS, p),
                 _ms(d, shape, "bfloat16", st, p), _ms(d, shape, "bfloat16", OURS, p),
                 _ms(d, shape, "float32", "eager loop", p)]
        lines.append(f"| {','.join(map(str, shape))} | {p} | " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def targets(data: dict) -> str:
    d, off, st = data["default"], data["off"], stock(data)
    lines = ["| shape (B,T,I,V,H) | pass | bf16 vs PyTorch bf16 (>= 5x) | bf16 vs cuDNN fp16 (>= 1x) "
             "| fp32 vs cuDNN fp32, TF32 default (>= 1x) | fp32 vs cuDNN fp32, TF32 off (>= 1x) |",
             "|" + " --- |" * 6]
    for shape, p in _cells(data):
        bf = _ms(d, shape, "bfloat16", OURS, p)
        lines.append(f"| {','.join(map(str, shape))} | {p} | "
                     f"{_ratio(bf, _ms(d, shape, 'bfloat16', st, p), 5.0)} | "
                     f"{_ratio(bf, _ms(d, shape, 'float16', st, p), 1.0)} | "
                     f"{_ratio(_ms(d, shape, 'float32', OURS, p), _ms(d, shape, 'float32', st, p), 1.0)} | "
                     f"{_ratio(_ms(off, shape, 'float32', OURS, p), _ms(off, shape, 'float32', st, p), 1.0)} |")
    b1 = _ms(d, BATCH1, "bfloat16", OURS, "forward")
    if b1 and d.get("cell", "rnn") == "rnn":
        per_step = 1000 * b1 / BATCH1[1]
        lines += ["", f"Batch 1 {BATCH1}, bf16 forward (whole module): {per_step:.2f} us per step "
                      f"(target <= 1.5: {'met' if per_step <= 1.5 else 'missed'})."]
    return "\n".join(lines)


def _floor(row: dict) -> dict:
    """One forward step's FLOP and byte floors (µs) for a sweep row, by gpu_sweep.py's own count."""
    import torch

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import gpu_sweep

    B, _, _, _, H = row["shape"]
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(row["dtype"], torch.float32)
    flop, nbytes = gpu_sweep.step_cost(row.get("cell", "rnn"), B, H, dtype)
    return {"flop": flop / (gpu_sweep.PEAK_TFLOPS[row["dtype"]] * 1e6), "byte": nbytes / (gpu_sweep.HBM_TBPS * 1e6)}


def kernels_alone(data: dict) -> str:
    sweep = data["sweep"]
    if not sweep:
        return ""
    lines = ["| shape (B,T,H) | dtype | form (auto) | programs | fwd us/step | bwd us/step | floor us/step "
             "(FLOPs, bytes) | rel. error vs fp64 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sweep["rows"]:
        if not r["auto"]:
            continue
        B, T, _, _, H = r["shape"]
        fl = r.get("floor_us_per_step") or _floor(r)  # rows of sweeps before the floors were recorded: computed
        floor = f"{max(fl.values()):.2g} ({fl['flop']:.2g}, {fl['byte']:.2g})"
        lines.append(f"| {B},{T},{H} | {r['dtype']} | {r['form']} | {r['programs']} | "
                     f"{r['forward_us_per_step']:.2f} | {r['backward_us_per_step']:.2f} | {floor} | "
                     f"{r['relative_error']:.1e} |")
    return "\n".join(lines)


def stock_paths(data: dict) -> str:
    """Which implementation torch ran for the stock provider, per dtype (the bench's "path" field)."""
    paths = {}
    for r in data["default"]["rows"]:
        if r["provider"] == stock(data) and r.get("path"):
            paths.setdefault(r["dtype"], set()).add(r["path"])
    return "; ".join(f"{d}: {' / '.join(sorted(p))}" for d, p in paths.items())


def summarize(data: dict) -> str:
    paths = stock_paths(data)
    parts = [header(data)] + ([f"{stock(data)} ran: {paths}."] if paths else []) + ["", side_by_side(data), "",
                                                                                    targets(data)]
    alone = kernels_alone(data)
    if alone:
        parts += ["", "The kernels alone (bench/gpu_sweep.py, default choice per size):", "", alone]
    return "\n".join(parts)


if __name__ == "__main__":
    print(summarize(load(sys.argv[1] if len(sys.argv) > 1 else ".", sys.argv[2] if len(sys.argv) > 2 else "")))
