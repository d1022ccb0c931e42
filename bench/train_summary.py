"""Mean and minimum over runs of mmrnn-bench JSON files (bench/cpu_train.sh writes them): per cell,
shape, stack and pass, x = torch's module time / ours in each run (side by side in one process) and
ours and torch's share of the machine's big-GEMM ceiling (a training step counts its GEMM FLOPs:
forward, BPTT, dW_hh and dW_ih/dW_img — 3x the forward's recurrent and input products; the
input needs no gradient in these cases).

    python bench/train_summary.py bench/results/train      prints the table, writes summary.json there
"""
from __future__ import annotations

import collections
import glob
import json
import os
import statistics
import sys


def summarise(folder: str) -> dict:
    files = sorted(glob.glob(os.path.join(folder, "*_run[0-9]*.json")))
    if not files:
        raise SystemExit(f"train_summary: no *_run<N>.json files in {folder}")
    groups = collections.defaultdict(list)  # (cell, shape, layers, bidirectional, pass) -> [(file, ours, stock)]
    machines = []
    for path in files:
        data = json.load(open(path))
        machines.append(data["machine"])
        rows = collections.defaultdict(dict)
        for r in data["rows"]:
            rows[(r["cell"], tuple(r["shape"]), r["layers"], r["bidirectional"], r["pass"])][r["provider"]] = r
        for key, by in rows.items():
            ours = by.get("mmrnn_ext")
            stock = next((r for p, r in by.items() if p.startswith("nn.")), None)
            if ours is not None and stock is not None:
                groups[key].append((os.path.basename(path), ours, stock))
    table = []
    for (cell, shape, layers, bidir, pass_name), runs in sorted(groups.items()):
        ratios = [s["ms"] / o["ms"] for _, o, s in runs]
        ours_frac = [o["fraction_of_ceiling"] for _, o, _ in runs if o["fraction_of_ceiling"] is not None]
        stock_frac = [s["fraction_of_ceiling"] for _, _, s in runs if s["fraction_of_ceiling"] is not None]
        table.append({
            "cell": cell, "shape": list(shape), "layers": layers, "bidirectional": bidir, "pass": pass_name,
            "runs": len(runs), "files": [f for f, _, _ in runs],
            "ours_ms": [o["ms"] for _, o, _ in runs], "torch_ms": [s["ms"] for _, _, s in runs],
            "x_mean": statistics.mean(ratios), "x_min": min(ratios), "x_runs": ratios,
            "ours_ceiling_mean": statistics.mean(ours_frac) if ours_frac else None,
            "ours_ceiling_min": min(ours_frac) if ours_frac else None,
            "torch_ceiling_mean": statistics.mean(stock_frac) if stock_frac else None,
            "noisy_runs": sum(bool(o["noisy"] or s["noisy"]) for _, o, s in runs),
        })
    m = machines[0]
    machine = {k: m.get(k) for k in ("device", "cpu_model", "cpu_vendor", "cpu_flags", "engine_isa", "cpu_cores",
                                     "torch_threads", "torch")}
    machine["gemm_ceiling_gflops"] = [mm["gemm_ceiling"]["gflops"] for mm in machines if mm.get("gemm_ceiling")]
    machine["dates"] = sorted({mm["date"] for mm in machines})
    return {"machine": machine, "rows": table}


def markdown(summary: dict) -> str:
    m = summary["machine"]
    ceil = m["gemm_ceiling_gflops"]
    lines = [f"{m['device']} ({m['cpu_vendor']}, engine ISA {m['engine_isa']}, {m['cpu_cores']} cores, torch {m['torch']}); "
             f"big-GEMM ceiling {min(ceil):.0f}-{max(ceil):.0f} GF/s over the runs",
             "",
             "| cell | B,T,I,V,H | stack | pass | runs | x mean | x min | ours % ceiling (mean / min) | torch % ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["rows"]:
        stack = f"{r['layers']} layer{'s' if r['layers'] > 1 else ''}{', bidirectional' if r['bidirectional'] else ''}"
        pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        lines.append(f"| {r['cell']} | {','.join(map(str, r['shape']))} | {stack} | {r['pass']} | {r['runs']} | "
                     f"{r['x_mean']:.2f} | {r['x_min']:.2f} | {pct(r['ours_ceiling_mean'])} / {pct(r['ours_ceiling_min'])} | "
                     f"{pct(r['torch_ceiling_mean'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python bench/train_summary.py FOLDER")
    summary = summarise(argv[0])
    with open(os.path.join(argv[0], "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))


if __name__ == "__main__":
    main()
