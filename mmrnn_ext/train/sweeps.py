"""mmrnn-train's runs: every requested variant (fusion) on one seed's split, checkpoint and plots
written; --seeds (mean and minimum over seeds); --sweep-gaps (every cell at every gap)."""
from __future__ import annotations

import os
import time

from ..models import CELLS
from .checkpoints import save_checkpoint
from .loop import log, report, curriculum_gaps, evaluate, train
from .plots import plot_confusion, plot_curves


ABLATION = ("add", "concat", "init", "late", "text_only", "image_only")


def _load_data(args, seed, gap=0):
    from .. import data as data_mod

    if args.data:
        return data_mod.load_user_data(args.data, args.features, seed), None
    return data_mod.digits_task(seed, gap), "digits"


def _curriculum(args, ds, seed, gap):
    """[(gap, Dataset)] for the stages before `gap` (the same examples, encoded with ds's vocabulary)."""
    from .. import data as data_mod

    if args.data or args.no_curriculum:
        return []
    stages = []
    for g in curriculum_gaps(gap):
        stages.append((g, data_mod.reencode(data_mod.digits_task(seed, g), ds.vocab)))
    return stages


def train_variants(args, device, rank, world, seed, suffix_seed, cell=None, gap=None, variants=None, out_suffix=""):
    """Train every requested variant on one seed's split -> ({variant: metrics}, dataset, main model)."""
    cell = cell or args.cell
    gap = args.gap if gap is None else gap
    ds, encoder = _load_data(args, seed, gap)
    for note in ds.notes:
        log(rank, f"note: {note}")
    stages = _curriculum(args, ds, seed, gap)
    epochs = args.epochs or (30 if args.quick else 60)
    patience = args.patience or (5 if args.quick else 8)
    results, main_model = {}, None
    for fusion in variants or (ABLATION if args.ablate else (args.fusion,)):
        config = {"vocab_size": len(ds.vocab), "num_classes": len(ds.labels), "image_dim": ds.image_dim,
                  "embed_dim": args.embed, "hidden_size": args.hidden, "num_layers": args.layers,
                  "bidirectional": args.bidirectional, "dropout": args.dropout, "fusion": fusion, "cell": cell,
                  "gap": gap, "image_encoder": encoder, "backend": args.backend,
                  "seed": seed, "lr": args.lr, "batch_size": args.batch_size, "epochs": epochs, "patience": patience,
                  "pixel_noise": args.pixel_noise if encoder == "digits" else 0.0}
        # the baselines cannot learn the interaction a curriculum stage waits for: no curriculum
        config["curriculum"] = [] if fusion in ("text_only", "image_only") else [g for g, _ in stages]
        start = time.time()
        model, history, _ = train(ds, config, args, device, rank, world,
                                  stages=[st for st in stages if st[0] in config["curriculum"]])
        metrics = evaluate(model, ds.test, device)
        seconds = time.time() - start
        reached = max(h["gap"] for h in history)
        log(rank, report(f"{fusion}, {cell}" + (f", gap {gap}" if gap else ""), metrics, ds.labels)
             + f"\n  (seed {seed}, {len(history)} epochs, {seconds:.1f} s"
             + (f"; curriculum {config['curriculum']} -> {gap}, reached {reached}" if config["curriculum"] else "") + ")")
        results[fusion] = {"test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                           "confusion_matrix": metrics["confusion_matrix"], "epochs": len(history),
                           "seconds": seconds, "seed": seed, "cell": cell, "gap": gap,
                           "curriculum_reached": reached, "history": history}
        if rank == 0:
            suffix = ("" if fusion == args.fusion else f"_{fusion}") + out_suffix + (f"_seed{seed}" if suffix_seed else "")
            save_checkpoint(os.path.join(args.out, f"model{suffix}.pt"), model, config, ds)
            title = f"fusion {fusion}, {cell}" + (f", gap {gap}" if gap else "")
            plot_curves(history, os.path.join(args.out, f"curves{suffix}.png"), f"mmrnn-train, {title}, seed {seed}")
            plot_confusion(metrics["confusion_matrix"], ds.labels, os.path.join(args.out, f"confusion{suffix}.png"),
                           f"test confusion matrix, {title}")
        if fusion == args.fusion:
            main_model = model
    return results, ds, main_model


def sweep(args, device, rank, world) -> dict:
    """--sweep-gaps: every cell at every gap, same budget and seed -> {cell: {gap: metrics}}; with
    --ablate also the text-only and image-only baselines at every gap (on --cell). With --seeds,
    each (cell, gap) is trained once per seed: test_accuracy and macro_f1 are the means, with their
    minimum and every seed's metrics beside them."""
    seeds = args.seeds or [0 if args.seed is None else args.seed]
    cells = args.cells or list(CELLS)
    runs = [(cell, cell, args.fusion) for cell in cells]
    if args.ablate:
        runs += [(name, args.cell, name) for name in ("text_only", "image_only")]
    result = {}
    for key, cell, fusion in runs:
        result[key] = {}
        for gap in args.sweep_gaps:
            per_seed = {}
            for seed in seeds:
                r, _, _ = train_variants(args, device, rank, world, seed, len(seeds) > 1, cell=cell, gap=gap,
                                          variants=(fusion,), out_suffix=f"_{key}_gap{gap}")
                per_seed[seed] = {fusion: {k: v for k, v in r[fusion].items() if k != "history"} | {"fusion": fusion}}
            result[key][str(gap)] = (per_seed[seeds[0]][fusion] if len(seeds) == 1
                                     else over_seeds(per_seed)[fusion] | {"cell": cell, "gap": gap, "fusion": fusion})
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean (min) over seeds {','.join(map(str, seeds))}"
    log(rank, f"\nsweep (test accuracy, {which}; fusion {args.fusion} for the cells):")
    log(rank, "  " + f"{'gap':<12}" + "".join(f"{g:>17}" for g in args.sweep_gaps))
    for key, per_gap in result.items():
        cells_text = [f"{m['test_accuracy']:.4f}" + (f" ({m['test_accuracy_min']:.4f})" if len(seeds) > 1 else "")
                      for m in (per_gap[str(g)] for g in args.sweep_gaps)]
        log(rank, "  " + f"{key:<12}" + "".join(f"{c:>17}" for c in cells_text))
    return result


def over_seeds(per_seed: dict) -> dict:
    """{seed: {variant: metrics}} -> {variant: mean and minimum over seeds, and each seed's metrics}."""
    out = {}
    for variant in next(iter(per_seed.values())):
        runs = {s: r[variant] for s, r in per_seed.items()}
        acc = [r["test_accuracy"] for r in runs.values()]
        f1 = [r["macro_f1"] for r in runs.values()]
        out[variant] = {"test_accuracy": sum(acc) / len(acc), "test_accuracy_min": min(acc),
                        "macro_f1": sum(f1) / len(f1), "macro_f1_min": min(f1),
                        "epochs": sum(r["epochs"] for r in runs.values()) / len(acc),
                        "seconds": sum(r["seconds"] for r in runs.values()) / len(acc),
                        "seeds": {str(s): {k: v for k, v in r.items() if k != "history"} for s, r in runs.items()}}
    return out
