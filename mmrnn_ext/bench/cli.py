"""mmrnn-bench: mmrnn_ext against what users run today, side by side in one process.

    mmrnn-bench                       the default grid for this machine's device (the RNN)
    mmrnn-bench --cell lstm           the same for the LSTM (--cell gru: the GRU)
    mmrnn-bench --quick               a small grid (under a minute on a 2-core CPU)
    mmrnn-bench --grid serving --stock-only   the five serving shapes, mmrnn_ext against torch's module only
    mmrnn-bench --shape 32,128,128,128,256 --dtype float32 --json out.json --plot out.png

Providers, all with the same weights on the same inputs (X = RNN, LSTM or GRU, per --cell):
    mmrnn_ext            mmrnn_ext.X(image_size=V), backend "auto" (each backend with --all-backends)
    nn.X(concat)         torch.nn.X on the input concatenated with the image (cuDNN on GPU; oneDNN
                         for the LSTM on CPU; in bfloat16 whichever path the installed torch takes:
                         the table and JSON ("path") name it, read from the aten ops one call ran)
    eager loop           a Python loop of torch ops, input and image projections precomputed
    torch.compile(loop)  that loop compiled (skipped, with the reason, when it would take too long)
    ONNX Runtime: ...    with --onnx: mmrnn_ext.X and nn.X(concat) exported (torch.onnx.export,
                         dynamo) and run in ONNX Runtime on CPU; inference only

Two passes per provider: "inference" (the forward under torch.no_grad, what a served model runs;
"forward" in the JSON) and "forward+backward" (a training step: the forward with gradients, then
backward from a gradient of ones made once outside the timing, as the input is). On CPU the machine's own ceiling is
measured first (the better of torch.mm and oneDNN's linear on a 2048^3 float32 GEMM) and every GF/s
figure is also given as a fraction of it; the CPU's model, vendor and the vector path mmrnn_ext takes
are named in the output and the JSON.

Before timing, every provider's output is compared with mmrnn_ext's; a disagreement beyond the
dtype's tolerance stops the run with an error rather than report a speed. With --layers > 1 the
image enters layer 0 only (the other layers' W_img are zero), so that nn.X on the concatenated
input computes the same function.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mmrnn_ext import _cli
from .cases import (CELLS, CPU_GRID, Case, DTYPES, DisagreementError, GPU_GRID, QUICK_CPU_GRID, QUICK_GPU_GRID,
                    SERVING_GRID)
from .decode import decode_main
from .grid import run_case
from .machine import gemm_ceiling, machine_info, recurrence_vs_mm
from .report import _Progress, format_recurrence, format_table, markdown_table, plot, run_rows
from .timing import NOISY_SPREAD

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmrnn-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", metavar="B,T,I,V,H",
                   help="batch,seq,input,image,hidden (repeatable; default: the device's grid)")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,float64,bfloat16,float16 (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cell", choices=list(CELLS), default="rnn", help="the recurrent cell (default rnn)")
    p.add_argument("--layers", type=_cli.positive_int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--all-backends", action="store_true", help="also time each available mmrnn_ext backend")
    p.add_argument("--quick", action="store_true", help="a small grid, few repeats, no torch.compile")
    p.add_argument("--grid", choices=["default", "serving"], default="default",
                   help="the shapes when no --shape is given: the device's default grid, or (CPU) the serving grid "
                        "(B,T,I,V,H) = " + " ".join(",".join(map(str, s)) for s in SERVING_GRID))
    p.add_argument("--autocast", choices=["bfloat16"], default=None,
                   help="run every provider under torch.autocast('cpu', <dtype>) (float32 models; CPU only)")
    p.add_argument("--decode", action="store_true",
                   help="time decoding instead of the grid: us per cell step at B=1 and B=16 (CPU, float32, no_grad)")
    p.add_argument("--train-step", action="store_true",
                   help="time the cells with gradients instead of the grid: one step forward+backward and forward "
                        "with grad enabled for every cell against torch's cell, and the attention decoder's training "
                        "step (CPU, float32)")
    p.add_argument("--migrate", action="store_true",
                   help="time two torch models (a 2-layer bidirectional GRU speech encoder, an LSTM text classifier) "
                        "served with no_grad before and after mmrnn_ext.convert (CPU, float32)")
    p.add_argument("--onnx", action="store_true",
                   help="also time both models exported to ONNX and run in ONNX Runtime (inference only; CPU, float32)")
    p.add_argument("--stock-only", action="store_true",
                   help="time mmrnn_ext against torch's own module only (no eager loop, no torch.compile)")
    p.add_argument("--repeats", type=_cli.positive_int, default=None, help="CPU timing repeats (median; default 5, quick 3)")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="TF32 for float32 on CUDA (sets torch.backends.cudnn/cuda.matmul.allow_tf32)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--compile-max-steps", type=_cli.non_negative_int, default=64, help="skip torch.compile above this many unrolled steps")
    p.add_argument("--compile-timeout", type=_cli.positive_float, default=240.0, help="seconds allowed for torch.compile")
    p.add_argument("--no-recurrence", action="store_true", help="skip the recurrence-vs-torch.mm GF/s section")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write the speedups as a grouped bar chart")
    p.add_argument("--markdown", metavar="RESULTS.json", help="print the README table of a results JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)))
        return 0
    if args.plot:
        _cli.require("mmrnn-bench", {"matplotlib": "--plot"}, "bench")
    _cli.writable_file("mmrnn-bench", "--json", args.json)
    _cli.writable_file("mmrnn-bench", "--plot", args.plot)
    device = _cli.device("mmrnn-bench", args.device)
    if (args.autocast or args.decode or args.train_step or args.migrate) and device.type != "cpu":
        flag = ("--autocast" if args.autocast else "--decode" if args.decode else "--train-step" if args.train_step
                else "--migrate")
        raise SystemExit(f"{flag}: a CPU measurement; use --device cpu")
    for on, flag in ((args.train_step, "--train-step"), (args.migrate, "--migrate")):
        others = [f for f, given in (("--decode", args.decode), ("--autocast", args.autocast), ("--onnx", args.onnx),
                                     ("--shape", args.shape), ("--train-step", args.train_step),
                                     ("--migrate", args.migrate)) if given and f != flag]
        if on and others:
            raise SystemExit(f"{flag}: its shapes are fixed and it runs alone (without --decode, --autocast, --onnx, "
                             f"--shape, --train-step, --migrate); got {' '.join(others)}")
    if args.onnx and (args.autocast or args.decode or device.type != "cpu"):
        raise SystemExit("--onnx: ONNX Runtime is timed on the grid, on CPU, without autocast")
    if args.onnx:
        _cli.require("mmrnn-bench", {m: "--onnx" for m in ("onnx", "onnxscript", "onnxruntime")}, "export")
    if args.autocast and args.dtype not in (None, "float32"):
        raise SystemExit(f"--autocast: autocast runs float32 models; got --dtype {args.dtype}")
    if args.decode:
        return decode_main(args, device)
    if args.train_step:
        return train_step_main(args, device)
    if args.migrate:
        return migrate_main(args, device)
    if args.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    dtype_names = (args.dtype or "float32").split(",")
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"--dtype: expected some of {list(DTYPES)}, got {name!r}")
    if args.shape:
        shapes = []
        for s in args.shape:
            parts = s.split(",")
            if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise SystemExit(f"--shape: expected five positive integers B,T,I,V,H, got {s!r}")
            shapes.append(tuple(int(p) for p in parts))
    else:
        grids = {("cpu", False): CPU_GRID, ("cpu", True): QUICK_CPU_GRID,
                 ("cuda", False): GPU_GRID, ("cuda", True): QUICK_GPU_GRID}
        if args.grid == "serving" and device.type != "cpu":
            raise SystemExit("--grid serving: the serving grid is a CPU grid; use --device cpu")
        shapes = SERVING_GRID if args.grid == "serving" else grids[(device.type, args.quick)]
    if args.quick:
        args.no_compile = True if not args.shape else args.no_compile
    args.repeats = args.repeats or (3 if args.quick else 5)
    cases = [(s, DTYPES[d]) for s in shapes for d in dtype_names]
    machine = machine_info(device)
    if device.type == "cpu":
        machine["gemm_ceiling"] = gemm_ceiling()
        args.ceiling_gflops = machine["gemm_ceiling"]["gflops"]
        print(f"mmrnn-bench: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path {machine['engine_isa']}); "
              f"big-GEMM ceiling {args.ceiling_gflops:.0f} GF/s ({machine['gemm_ceiling']['by']}, 2048^3 float32)",
              flush=True)
    progress = _Progress()
    rows, skipped, recurrence, failures = [], [], [], []
    for shape, dtype in cases:
        case = Case(*shape, dtype=dtype, device=device, layers=args.layers, bidirectional=args.bidirectional,
                    cell=args.cell)
        try:
            case_rows, case_skipped = run_case(case, args, progress)
        except DisagreementError as exc:  # no speed for this case; the others still run, the exit code is 1
            print(f"mmrnn-bench: FAILED: {exc}", file=sys.stderr)
            failures.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "error": str(exc)})
            continue
        rows += case_rows
        skipped += [{"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "provider": k, "reason": v}
                    for k, v in case_skipped.items()]
        if not args.no_recurrence:
            recurrence.append(recurrence_vs_mm(case, args.repeats, getattr(args, "ceiling_gflops", None)))
    progress.close()
    result = {"machine": machine, "cell": args.cell, "layers": args.layers,
              "bidirectional": args.bidirectional, "noisy_spread_threshold": NOISY_SPREAD,
              "unreliable": sum(1 for r in rows + recurrence if r.get("noisy")),
              "rows": rows, "skipped": skipped, "recurrence": recurrence, "failures": failures}
    print(f"mmrnn-bench --cell {args.cell} on {result['machine']['device']} (torch {torch.__version__}, "
          f"{os.cpu_count()} cores)")
    print(format_table(rows))
    for s in skipped:
        print(f"  skipped {s['provider']} at {s['shape']} {s['dtype']}: {s['reason']}")
    if recurrence:
        print(f"\nrecurrence alone (forward) vs T x torch.mm of the same [B,H]x[H,{CELLS[args.cell][2]}H] GEMM:")
        for r in recurrence:
            print(f"  {r['shape']} {r['dtype']} [{r['backend']}]: " + format_recurrence(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if failures:
        print(f"mmrnn-bench: FAILED: {len(failures)} case(s) disagreed; no speed is reported for them", file=sys.stderr)
        return 1
    return 0


def train_step_main(args, device) -> int:
    from . import train_step as ts

    return _fixed_cases_main(args, device, "--train-step", "train_step", ts.train_step_rows, ts.format_rows)


def migrate_main(args, device) -> int:
    from . import migrate as mg

    return _fixed_cases_main(args, device, "--migrate", "migrate", mg.migrate_rows, mg.format_rows)


def _fixed_cases_main(args, device, flag, key, rows_of, format_rows) -> int:
    """A measurement with its own fixed cases (--train-step, --migrate): rows_of(quick, rounds) ->
    rows, printed with format_rows and written as {"machine", key: rows} to --json."""
    machine = machine_info(device)
    rounds = args.repeats or (3 if args.quick else 7)
    header = (f"mmrnn-bench {flag}: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path {machine['engine_isa']}), "
              f"torch {torch.__version__}, {machine['torch_threads']} threads, {rounds} rounds")
    return run_rows(header, lambda: rows_of(args.quick, rounds), format_rows, args.json,
                    {"machine": machine, "key": key, "noisy_spread_threshold": NOISY_SPREAD})
