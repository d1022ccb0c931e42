"""mmrnn-train --eval: a checkpoint evaluated on the test split it was tested on, rebuilt from its
record of the data (refused when the data given are not that data)."""
from __future__ import annotations

from .checkpoints import load_checkpoint
from .loop import PROG, log, report, evaluate


def _load_eval_data(args, path, config, vocab, labels, source):
    """The checkpoint's test split, rebuilt from its record of the data; refuses when the data given
    are not the data it was trained and tested on."""
    from .. import data as data_mod

    where = f"--eval {path}"
    if source["kind"] == "digits":
        if args.data:
            raise SystemExit(f"{PROG}: {where}: the model was trained on the built-in task; drop --data/--features")
        ds = data_mod.reencode(data_mod.digits_task(source["seed"], source["gap"]), vocab)
    else:
        if not args.data:
            raise SystemExit(f"{PROG}: {where}: the model was trained on your data ({source['data']} with "
                             f"{source['features']}); pass them with --data and --features")
        for flag, key in (("data", "data_sha256"), ("features", "features_sha256")):
            if data_mod.file_digest(getattr(args, flag)) != source[key]:
                raise SystemExit(f"{PROG}: {where}: --{flag} {getattr(args, flag)} is not the file the model was "
                                 f"trained and tested on ({source[flag]}: its sha256 differs)")
        ds = data_mod.load_user_data(args.data, args.features, source["seed"], vocab=vocab, labels=labels)
    if ds.image_dim != config["image_dim"]:
        raise SystemExit(f"{PROG}: {where}: the model takes {config['image_dim']}-wide image features, the data give "
                         f"{ds.image_dim}")
    if data_mod.split_digest(ds.test) != source["test_digest"]:
        raise SystemExit(f"{PROG}: {where}: the rebuilt test split differs from the one the model was tested on "
                         "(a different mmrnn_ext version splits differently): not evaluated")
    return ds


def evaluate_checkpoint(args, device, rank):
    from ..data import DataError

    try:
        model, config, vocab, labels, source = load_checkpoint(args.eval, device, backend=args.backend)
        if args.seed is not None and args.seed != source["seed"]:
            raise SystemExit(f"{PROG}: --seed {args.seed}: the checkpoint was trained and tested with seed "
                             f"{source['seed']}; --eval uses its split (drop --seed)")
        ds = _load_eval_data(args, args.eval, config, vocab, labels, source)
    except (ValueError, DataError) as exc:
        raise SystemExit(f"{PROG}: {exc}") from None
    trained_gap = source.get("gap", 0)
    gap = trained_gap
    if args.eval_gap is not None and source["kind"] == "digits" and args.eval_gap != trained_gap:
        # the same test statements (split, images, labels) at another gap: the filler words a model
        # trained at a shorter gap never saw map to <unk>, as any unknown word does
        from .. import data as data_mod

        gap = args.eval_gap
        ds = data_mod.reencode(data_mod.digits_task(source["seed"], gap), vocab)
        log(rank, f"note: evaluating at gap {gap}; the checkpoint was trained at gap {trained_gap} (same test "
                   "statements, images and labels)")
    metrics = evaluate(model, ds.test, device)
    log(rank, report(f"{config['fusion']}, {config['cell']}" + (f", gap {gap}" if gap else ""), metrics, labels))
    result = {"test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
              "confusion_matrix": metrics["confusion_matrix"], "seed": source["seed"], "cell": config["cell"],
              "gap": gap, "trained_gap": trained_gap, "backend": args.backend}
    if args.export:
        from .deploy import export_classifier

        result["export"] = export_classifier(model, config, vocab, labels, source, ds, args.export, rank)
    return {config["fusion"]: result}
