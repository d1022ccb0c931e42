"""mmrnn-train: train and evaluate a multimodal (text + image) classifier on mmrnn_ext.RNN, LSTM or GRU.

    mmrnn-train --quick                      the built-in digits-and-statements task, fusion "add"
    mmrnn-train --quick --cell lstm --gap 100    the same with 100 filler words after the negation
    mmrnn-train --quick --ablate --json m.json   + text-only / image-only baselines and every fusion mode
    mmrnn-train --quick --sweep-gaps 0,25,50,100,200 --cells rnn,lstm,gru --json s.json --plot s.png
    mmrnn-train --data my.jsonl --features feats.npy   your own data (see mmrnn_ext.data)
    mmrnn-train --eval runs/mmrnn-train/model.pt       evaluate a checkpoint on its own test split
    mmrnn-train --eval runs/mmrnn-train/model.pt --export runs/export   + model.onnx and model.pt2, verified
    mmrnn-train --quick --explain 4          Integrated Gradients: a PNG per test example

Writes under --out (default runs/mmrnn-train): model.pt (weights, vocabulary, labels, config and
the data's record, sealed with a content digest; loaded with torch.load(weights_only=True), so a
checkpoint is data, never code), curves.png, confusion.png, explain_*.png. Metrics come from
scikit-learn. Launched by torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel, each
process on its share of every batch.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .. import _cli
from ..models import CELLS, FUSION_HELP, FUSIONS
from .attributions import explain
from .evaluation import evaluate_checkpoint
from .loop import CURRICULUM_ADVANCE, PIXEL_NOISE, PROG, dist_setup, log
from .plots import plot_sweep
from .sweeps import over_seeds, train_variants, sweep

# numpy, scikit-learn, matplotlib (the "train" extra) and captum (--explain) are imported where they
# are used, after main() has checked that they are installed: --help works with the core install.


DEFAULT_CELL = "lstm"


CELL_HELP = ("the recurrent cell (default %(default)s: with --quick at gap 0 over seeds 0-9 it reached the highest mean test "
             "accuracy of the three for every image fusion (add 0.9807, minimum 0.9751), and the LSTM and GRU keep the "
             "negation across long gaps where the tanh RNN fails; gru is the cheaper gated cell, rnn the cheapest: "
             "docs/results.md, 'Every cell on every seed')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default is argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


# The built-in task's longest gap: every statement grows by one token per gap step, so the dataset's
# token tensor and each epoch's work grow linearly with it (~3,000 statements per split); at 1000 an
# epoch of the --quick budget already takes minutes on a 2-core CPU, and beyond that memory (tens
# of GB at 10^6) runs out before anything is learnt.
MAX_GAP = 1000


gap_int = _cli._number_type(int, lambda v: 0 <= v <= MAX_GAP,
                            f"an integer in [0, {MAX_GAP}] (the built-in task's sequences grow by one token per gap step)")


def parse_args(argv=None):
    epilog = "fusion modes:\n" + "\n".join(f"  {k:<11} {v}" for k, v in FUSION_HELP.items())
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=_HelpFormatter)
    p.add_argument("--data", help="your data: .jsonl or .csv with text, label, image_index (default: the built-in task)")
    p.add_argument("--features", help="your image features: .npy [num_images, F] (with --data)")
    p.add_argument("--fusion", choices=FUSIONS, default="add", help="how the image enters the model (below)")
    p.add_argument("--cell", choices=list(CELLS), default=DEFAULT_CELL, help=CELL_HELP)
    p.add_argument("--gap", type=gap_int, default=0,
                   help="the built-in task with N filler words between the negation and the rest of each statement")
    p.add_argument("--no-curriculum", action="store_true",
                   help="with --gap N: train on gap N from the start (default: gaps 0, N/8, N/4, N/2, then N, each "
                   f"until validation accuracy reaches {CURRICULUM_ADVANCE})")
    p.add_argument("--sweep-gaps", metavar="LIST", help="comma-separated gaps: train every --cells cell at each "
                   "(same budget and seed); --json keyed by cell and gap, --plot accuracy against gap")
    p.add_argument("--cells", metavar="LIST", help="with --sweep-gaps: comma-separated cells (default rnn,lstm,gru)")
    p.add_argument("--plot", metavar="PATH.png", help="with --sweep-gaps: test accuracy against gap, a line per cell")
    p.add_argument("--embed", type=_cli.positive_int, default=32, help="token embedding size")
    p.add_argument("--hidden", type=_cli.positive_int, default=64, help="recurrent hidden size")
    p.add_argument("--layers", type=_cli.positive_int, default=1, help="recurrent layers")
    p.add_argument("--bidirectional", action="store_true", help="a bidirectional recurrence")
    p.add_argument("--dropout", type=_cli.probability, default=0.0, help="dropout between layers and before the head")
    p.add_argument("--epochs", type=_cli.positive_int, default=None, help="at most this many epochs (default 60, --quick 30)")
    p.add_argument("--patience", type=_cli.positive_int, default=None,
                   help="early stopping: epochs without validation gain (default 8, --quick 5)")
    p.add_argument("--pixel-noise", type=_cli.non_negative_float, default=PIXEL_NOISE,
                   help="the built-in task's digit encoder: spread of the Gaussian noise on its standardised pixels "
                   "in training, from the epoch after validation leaves the chance plateau (0: none)")
    p.add_argument("--batch-size", type=_cli.positive_int, default=128, help="examples per optimisation step")
    p.add_argument("--lr", type=_cli.positive_float, default=3e-3, help="Adam learning rate")
    p.add_argument("--max-steps", type=_cli.non_negative_int, default=0,
                   help="stop after this many optimisation steps (0: no limit)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the split and the initialisation (default 0; --eval: the checkpoint's)")
    p.add_argument("--seeds", metavar="LIST", help="comma-separated seeds: train every variant once per seed and "
                   "report mean and minimum (JSON: test_accuracy is the mean)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "reference"], help="mmrnn_ext backend")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer epochs: a few minutes on a 2-core CPU")
    p.add_argument("--ablate", action="store_true", help="also train text-only, image-only and every fusion mode")
    p.add_argument("--explain", type=_cli.non_negative_int, default=0, metavar="N",
                   help="attribution PNGs for N test examples (needs captum)")
    p.add_argument("--eval", metavar="CHECKPOINT", help="evaluate a saved checkpoint on the test split it was tested on")
    p.add_argument("--out", default="runs/mmrnn-train", help="folder for the checkpoint and plots")
    p.add_argument("--json", metavar="PATH", help="write all metrics, keyed by variant")
    p.add_argument("--export", metavar="DIR", help="with --eval: write DIR/model.onnx (ONNX Runtime) and DIR/model.pt2 "
                   "(torch.export + AOTInductor) of the whole classifier, each checked against eager on the test split")
    args = p.parse_args(argv)
    args.sweep_gaps = _int_list(p, "--sweep-gaps", args.sweep_gaps, minimum=0)
    if args.sweep_gaps is not None and max(args.sweep_gaps) > MAX_GAP:
        p.error(f"argument --sweep-gaps: expected gaps in [0, {MAX_GAP}] (the built-in task's sequences grow by one "
                f"token per gap step), got {max(args.sweep_gaps)}")
    if args.cells is not None:
        args.cells = args.cells.split(",")
        unknown = [c for c in args.cells if c not in CELLS]
        if unknown or len(set(args.cells)) != len(args.cells):
            p.error(f"argument --cells: expected distinct cells among {list(CELLS)}, got {','.join(args.cells)!r}")
        if args.sweep_gaps is None:
            p.error("argument --cells: only with --sweep-gaps (one run takes --cell)")
    if args.plot and args.sweep_gaps is None:
        p.error("argument --plot: only with --sweep-gaps")
    if args.sweep_gaps is not None:
        for flag in ("eval", "explain", "data"):
            if getattr(args, flag):
                p.error(f"argument --sweep-gaps: not with --{flag}")
        if args.gap:
            p.error("argument --sweep-gaps: not with --gap")
    if args.data and args.gap:
        p.error("argument --gap: the built-in task's knob; not with --data")
    given = _given_options(p, argv)
    if args.data and "pixel_noise" in given:
        p.error("argument --pixel-noise: the built-in task's digit encoder; not with --data (your image features "
                "are used as given)")
    args.seeds = _int_list(p, "--seeds", args.seeds, minimum=0)
    if args.seeds is not None:
        if args.seed is not None:
            p.error("argument --seeds: not with --seed")
    if (args.data is None) != (args.features is None):
        p.error("--data and --features go together: records (.jsonl/.csv) and their image features (.npy)")
    if args.export and not args.eval:
        p.error("argument --export: only with --eval CHECKPOINT (train first, then export the checkpoint)")
    if args.eval:
        for flag in ("seeds", "explain", "ablate"):
            if getattr(args, flag):
                p.error(f"--eval: not with --{flag} (evaluation reuses the checkpoint's model, seed and split)")
        for dest in EVAL_FIXED:
            if dest in given:
                flag = "--" + dest.replace("_", "-")
                p.error(f"--eval: not with {flag} (the checkpoint fixes the model and how it was trained; "
                        "--eval takes --gap, --backend, --device, --json, --export and, for your data, "
                        "--data/--features)")
        args.eval_gap = args.gap if "gap" in given else None
    return args


# What a checkpoint fixes: given with --eval, each is refused by name rather than silently ignored.
EVAL_FIXED = ("fusion", "cell", "embed", "hidden", "layers", "bidirectional", "dropout", "epochs", "patience",
              "batch_size", "lr", "pixel_noise", "max_steps", "no_curriculum", "quick", "out", "sweep_gaps", "cells", "plot")


def _given_options(parser, argv) -> set:
    """The destinations of the options given on the command line (whatever their values): a parse
    with every default suppressed."""
    import copy

    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given, _ = quiet.parse_known_args(argv)
    return set(vars(given))


def _int_list(p, flag, text, minimum):
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"argument {flag}: expected comma-separated integers, got {text!r}")
    if any(v < minimum for v in values) or len(set(values)) != len(values):
        p.error(f"argument {flag}: expected distinct integers >= {minimum}, got {text!r}")
    return values


def _check_environment(args):
    """Everything a run needs, checked before it loads data or trains."""
    needs = {"numpy": "data and metrics", "sklearn": "the built-in task and the metrics"}
    if not args.eval:
        needs["matplotlib"] = "the loss curves and confusion plots"
    if args.explain:
        needs["captum"] = "--explain"
    if args.export:
        _cli.require(PROG, {name: "--export" for name in ("onnx", "onnxscript", "onnxruntime")}, "export")
    _cli.require(PROG, needs, "train")
    device = _cli.device(PROG, args.device)
    _check_backend(args.backend, device)
    if args.eval and not os.path.isfile(args.eval):
        raise SystemExit(f"{PROG}: --eval {args.eval}: no such file")
    for flag in ("data", "features"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise SystemExit(f"{PROG}: --{flag} {path}: no such file")
    _cli.writable_file(PROG, "--json", args.json)
    if args.export:
        _cli.writable_folder(PROG, "--export", args.export)
    _cli.writable_file(PROG, "--plot", args.plot)
    if not args.eval:
        _cli.writable_folder(PROG, "--out", args.out)
    return device


def _check_backend(backend: str, device: torch.device) -> None:
    """--backend must run here (on --device), checked before any data is loaded: one line otherwise."""
    if backend == "auto":
        return
    from .. import _backends

    status = _backends.backends()[backend]
    if not status["available"]:
        raise SystemExit(f"{PROG}: --backend {backend}: not available here: {status['detail']}")
    try:
        _backends.select(backend, device, torch.float32, "rnn")
    except (RuntimeError, TypeError) as exc:
        raise SystemExit(f"{PROG}: --backend {backend}: {str(exc).splitlines()[0]}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = _check_environment(args)
    rank, world = dist_setup(device)
    if args.eval:
        results = evaluate_checkpoint(args, device, rank)
    elif args.sweep_gaps is not None:
        results = sweep(args, device, rank, world)
        if args.plot and rank == 0:
            plot_sweep(results, args.plot, f"mmrnn-train --quick, fusion {args.fusion}: accuracy against gap"
                       if args.quick else f"fusion {args.fusion}: accuracy against gap", chance=0.5)
            log(rank, f"wrote {args.plot}")
    else:
        from ..data import DataError

        seeds = args.seeds or [0 if args.seed is None else args.seed]
        per_seed = {}
        try:
            for seed in seeds:
                per_seed[seed], ds, main_model = train_variants(args, device, rank, world, seed, len(seeds) > 1)
        except DataError as exc:
            raise SystemExit(f"{PROG}: {exc}") from None
        results = per_seed[seeds[0]] if len(seeds) == 1 else over_seeds(per_seed)
        if args.ablate or len(seeds) > 1:
            label = "mean (min)" if len(seeds) > 1 else ""
            log(rank, f"\nsummary (test split{', seeds ' + ','.join(map(str, seeds)) if len(seeds) > 1 else ''}):"
                 f"\n  variant      accuracy {label}  macro-F1 {label}")
            for name, r in results.items():
                mins = (f" ({r['test_accuracy_min']:.4f})", f" ({r['macro_f1_min']:.4f})") if len(seeds) > 1 else ("", "")
                log(rank, f"  {name:<12} {r['test_accuracy']:.4f}{mins[0]}    {r['macro_f1']:.4f}{mins[1]}")
        if args.explain and rank == 0:
            import numpy as np

            n = min(args.explain, len(ds.test))
            picks = np.random.default_rng(seeds[-1]).choice(len(ds.test), size=n, replace=False)
            expl = explain(main_model, ds.test, ds.vocab, ds.labels, [int(k) for k in picks], args.out, device)
            for e in expl:
                log(rank, f"explain #{e['index']}: {e['text']!r} label {e['label']} predicted {e['prediction']}; "
                     f"text {100 * e['modality_share']['text']:.0f}% / image {100 * e['modality_share']['image']:.0f}%")
            results[args.fusion]["explanations"] = expl
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        log(rank, f"wrote {args.json}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank done (rank 0 writes files) before the process group is torn down
        dist.destroy_process_group()
    return 0
