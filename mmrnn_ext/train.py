"""mmrnn-train: train and evaluate a multimodal (text + image) classifier on mmrnn_ext.RNN.

    mmrnn-train --quick                      the built-in digits-and-statements task, fusion "add"
    mmrnn-train --quick --ablate --json m.json   + text-only / image-only baselines and every fusion mode
    mmrnn-train --data my.jsonl --features feats.npy   your own data (see mmrnn_ext.data)
    mmrnn-train --eval runs/mmrnn-train/model.pt       reload a checkpoint and evaluate it
    mmrnn-train --quick --explain 4          Integrated Gradients: a PNG per test example

Writes under --out (default runs/mmrnn-train): model.pt (weights, vocabulary, labels and config;
loaded with torch.load(weights_only=True), so a checkpoint is data, never code), curves.png,
confusion.png, explain_*.png. Metrics come from scikit-learn. Launched by torchrun (WORLD_SIZE > 1)
it trains with DistributedDataParallel, each process on its share of every batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data as data_mod
from .models import FUSIONS, MultimodalClassifier

CHECKPOINT_FORMAT = "mmrnn-train/1"
ABLATION = ("add", "concat", "init", "late", "text_only", "image_only")


# --- distributed (torchrun) ----------------------------------------------------------------------

def _dist_setup(device: torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _log(rank, *args, **kwargs):
    if rank == 0:
        print(*args, **kwargs)


# --- training ------------------------------------------------------------------------------------

def build_model(config: dict) -> MultimodalClassifier:
    return MultimodalClassifier(
        config["vocab_size"], config["num_classes"], config["image_dim"], embed_dim=config["embed_dim"],
        hidden_size=config["hidden_size"], num_layers=config["num_layers"], bidirectional=config["bidirectional"],
        dropout=config["dropout"], fusion=config["fusion"], image_encoder=config["image_encoder"],
        backend=config["backend"])


def _batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size][rank::world]


def evaluate(model, split, device, batch_size=1024) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score

    model.eval()
    preds, losses = [], []
    with torch.no_grad():
        for i in range(0, len(split), batch_size):
            sl = slice(i, i + batch_size)
            logits = model(split.tokens[sl].to(device), split.lengths[sl].to(device), split.images[sl].to(device))
            losses.append(F.cross_entropy(logits, split.labels[sl].to(device), reduction="sum").item())
            preds.append(logits.argmax(-1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    y = split.labels.numpy()
    labels = list(range(int(model.head[-1].out_features)))
    return {"accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
            "loss": sum(losses) / max(1, len(y)),
            "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist()}


def train(dataset, config: dict, args, device, rank=0, world=1, progress=True, log_every=None):
    """-> (model, history, steps) with the best validation weights restored. history: per epoch
    train loss/accuracy and validation accuracy; steps: every optimisation step's training loss."""
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    tr = dataset.train
    history, steps = [], []
    best, best_state, stale = -1.0, None, 0
    bar = None
    if progress and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=config["epochs"], desc=f"train {config['fusion']}", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    for epoch in range(config["epochs"]):
        net.train()
        total, correct, seen = 0.0, 0, 0
        for idx in _batches(len(tr), config["batch_size"], gen, rank, world):
            logits = net(tr.tokens[idx].to(device), tr.lengths[idx].to(device), tr.images[idx].to(device))
            y = tr.labels[idx].to(device)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps.append(loss.item())
            if args.max_steps and len(steps) >= args.max_steps:
                break
            total += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
        val = evaluate(model, dataset.val, device)
        history.append({"epoch": epoch + 1, "train_loss": total / max(1, seen), "train_accuracy": correct / max(1, seen),
                        "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        if bar is not None:
            bar.set_postfix(loss=f"{total / max(1, seen):.3f}", acc=f"{correct / max(1, seen):.3f}",
                            val=f"{val['accuracy']:.3f}")
            bar.update(1)
        if val["accuracy"] > best:
            best, stale = val["accuracy"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if stale >= config["patience"] or (args.max_steps and len(steps) >= args.max_steps):
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history, steps


# --- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(path, model, config, dataset):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "vocab": list(dataset.vocab),
                "labels": list(dataset.labels), "state_dict": model.state_dict()}, path)


def load_checkpoint(path, device="cpu"):
    """-> (model, config, vocab, labels). A checkpoint is data: torch.load(weights_only=True)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint: no file at {path!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} cannot be read (truncated, tampered with, or not an mmrnn-train "
                         f"checkpoint): {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r}: expected format {CHECKPOINT_FORMAT!r}, got "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}")
    config = ckpt["config"]
    model = build_model(config).to(device)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own config: {str(exc)[:300]}") from None
    return model, config, ckpt["vocab"], ckpt["labels"]


# --- plots ---------------------------------------------------------------------------------------

def plot_curves(history, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy loss")
    a.legend()
    b.plot(ep, [h["train_accuracy"] for h in history], label="train")
    b.plot(ep, [h["val_accuracy"] for h in history], label="validation")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1.01)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm, labels, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ConfusionMatrixDisplay(np.array(cm), display_labels=labels).plot(ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- attributions --------------------------------------------------------------------------------

def explain(model, split, vocab, labels, indices, out_dir, device, pixels=True) -> list:
    """Integrated Gradients (Captum) over token embeddings and image inputs, baseline zeros; writes
    explain_<i>.png per example and returns per-token / per-input attributions and modality shares."""
    from captum.attr import IntegratedGradients
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    results = []
    for k in indices:
        L = int(split.lengths[k])
        tok = split.tokens[k:k + 1, :L].to(device)
        lens = split.lengths[k:k + 1].to(device)
        img = split.images[k:k + 1].to(device)
        with torch.no_grad():
            pred = int(model(tok, lens, img).argmax(-1))
        emb = model.embed(tok).detach()

        def forward(e, im):
            return model.forward_embedded(e, lens.expand(e.shape[0]), im)

        ig = IntegratedGradients(forward)
        a_emb, a_img = ig.attribute((emb, img), baselines=(torch.zeros_like(emb), torch.zeros_like(img)),
                                    target=pred, n_steps=32)
        tok_attr = a_emb.sum(-1)[0].detach().cpu().numpy()
        img_attr = a_img[0].detach().cpu().numpy()
        text_mass, image_mass = float(np.abs(tok_attr).sum()), float(np.abs(img_attr).sum())
        share = {"text": text_mass / max(1e-12, text_mass + image_mass), "image": image_mass / max(1e-12, text_mass + image_mass)}
        words = split.texts[k].split()
        results.append({"index": int(k), "text": split.texts[k], "label": labels[int(split.labels[k])],
                        "prediction": labels[pred], "token_attributions": dict(zip(range(L), tok_attr.tolist())),
                        "words": words, "modality_share": share})
        fig, (ax_t, ax_i) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [3, 1]})
        scale = max(1e-12, np.abs(tok_attr).max())
        x = 0.02
        for w, a in zip(words, tok_attr):
            color = plt.cm.RdBu(0.5 + 0.5 * a / scale)
            t = ax_t.text(x, 0.5, w, fontsize=13, va="center", bbox=dict(facecolor=color, edgecolor="none", pad=3))
            fig.canvas.draw()
            bb = t.get_window_extent().transformed(ax_t.transAxes.inverted())
            x = bb.x1 + 0.02
        ax_t.axis("off")
        ax_t.set_title(f"label {labels[int(split.labels[k])]}, predicted {labels[pred]}; "
                       f"text {100 * share['text']:.0f}% / image {100 * share['image']:.0f}% of |attribution| "
                       "(red: against, blue: for)", fontsize=9)
        if pixels and split.raw_images is not None and img_attr.size == 64:
            ax_i.imshow(split.raw_images[k], cmap="gray_r")
            ax_i.imshow(img_attr.reshape(8, 8), cmap="RdBu", alpha=0.55,
                        vmin=-np.abs(img_attr).max(), vmax=np.abs(img_attr).max())
            ax_i.set_title("digit and pixel attributions", fontsize=9)
            ax_i.axis("off")
        else:
            top = np.argsort(-np.abs(img_attr))[:10]
            ax_i.barh(range(len(top)), img_attr[top])
            ax_i.set_yticks(range(len(top)), [f"feature {j}" for j in top], fontsize=7)
            ax_i.set_title("top image-feature attributions", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"explain_{k}.png"), dpi=110)
        plt.close(fig)
    return results


# --- CLI -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmrnn-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="your data: .jsonl or .csv with text, label, image_index (default: the built-in task)")
    p.add_argument("--features", help="your image features: .npy [num_images, F] (with --data)")
    p.add_argument("--fusion", choices=FUSIONS, default="add")
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default 60, --quick 30)")
    p.add_argument("--patience", type=int, default=None, help="early stopping: epochs without validation gain (default 8, --quick 5)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimisation steps (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="mmrnn_ext backend: auto, cpp, triton, reference")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer epochs: under 3 minutes on a 2-core CPU")
    p.add_argument("--ablate", action="store_true", help="also train text-only, image-only and every fusion mode")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="attribution PNGs for N test examples")
    p.add_argument("--eval", metavar="CHECKPOINT", help="evaluate a saved checkpoint on the test split")
    p.add_argument("--out", default="runs/mmrnn-train", help="folder for the checkpoint and plots")
    p.add_argument("--json", metavar="PATH", help="write all metrics, keyed by variant")
    return p.parse_args(argv)


def _load_data(args, vocab=None, labels=None, image_dim=None):
    if args.data:
        if not args.features:
            raise SystemExit("--data needs --features (a .npy of image feature vectors)")
        ds = data_mod.load_user_data(args.data, args.features, args.seed, vocab=vocab, labels=labels)
        encoder = None
    else:
        ds = data_mod.digits_task(args.seed)
        if vocab is not None:  # a checkpoint's vocabulary: re-encode with it
            for split in (ds.train, ds.val, ds.test):
                split.tokens, split.lengths = data_mod.encode(split.texts, vocab)
            ds.vocab = vocab
        encoder = "digits"
    if image_dim is not None and ds.image_dim != image_dim:
        raise SystemExit(f"--features: the checkpoint was trained on {image_dim}-wide image features, "
                         f"these are {ds.image_dim} wide")
    return ds, encoder


def _report(name, metrics, labels):
    cm = metrics["confusion_matrix"]
    lines = [f"[{name}] test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
             "  confusion matrix (rows: true, columns: predicted; " + ", ".join(labels) + "):"]
    lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in cm]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = _dist_setup(device)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.eval:
        try:
            model, config, vocab, labels = load_checkpoint(args.eval, device)
        except ValueError as exc:
            print(f"mmrnn-train: {exc}", file=sys.stderr)
            return 2
        ds, _ = _load_data(args, vocab=vocab, labels=labels, image_dim=config["image_dim"])
        metrics = evaluate(model, ds.test, device)
        _log(rank, _report(config["fusion"], metrics, labels))
        results[config["fusion"]] = {"test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                     "confusion_matrix": metrics["confusion_matrix"]}
    else:
        ds, encoder = _load_data(args)
        epochs = args.epochs or (30 if args.quick else 60)
        patience = args.patience or (5 if args.quick else 8)
        variants = ABLATION if args.ablate else (args.fusion,)
        for fusion in variants:
            config = {"vocab_size": len(ds.vocab), "num_classes": len(ds.labels), "image_dim": ds.image_dim,
                      "embed_dim": args.embed, "hidden_size": args.hidden, "num_layers": args.layers,
                      "bidirectional": args.bidirectional, "dropout": args.dropout, "fusion": fusion,
                      "image_encoder": encoder, "backend": args.backend, "seed": args.seed, "lr": args.lr,
                      "batch_size": args.batch_size, "epochs": epochs, "patience": patience}
            start = time.time()
            model, history, _ = train(ds, config, args, device, rank, world)
            metrics = evaluate(model, ds.test, device)
            _log(rank, _report(fusion, metrics, ds.labels) + f"\n  ({len(history)} epochs, {time.time() - start:.1f} s)")
            results[fusion] = {"test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                               "confusion_matrix": metrics["confusion_matrix"], "epochs": len(history),
                               "seconds": time.time() - start, "history": history}
            if rank == 0:
                suffix = "" if fusion == args.fusion else f"_{fusion}"
                save_checkpoint(os.path.join(args.out, f"model{suffix}.pt"), model, config, ds)
                plot_curves(history, os.path.join(args.out, f"curves{suffix}.png"), f"mmrnn-train, fusion {fusion}")
                plot_confusion(metrics["confusion_matrix"], ds.labels, os.path.join(args.out, f"confusion{suffix}.png"),
                               f"test confusion matrix, fusion {fusion}")
            if fusion == args.fusion:
                main_model = model
        if args.ablate:
            _log(rank, "\nablation (test split):\n  variant      accuracy  macro-F1")
            for name, r in results.items():
                _log(rank, f"  {name:<12} {r['test_accuracy']:.4f}    {r['macro_f1']:.4f}")
        if args.explain and rank == 0:
            n = min(args.explain, len(ds.test))
            picks = np.random.default_rng(args.seed).choice(len(ds.test), size=n, replace=False)
            expl = explain(main_model, ds.test, ds.vocab, ds.labels, [int(k) for k in picks], args.out, device)
            for e in expl:
                _log(rank, f"explain #{e['index']}: {e['text']!r} label {e['label']} predicted {e['prediction']}; "
                     f"text {100 * e['modality_share']['text']:.0f}% / image {100 * e['modality_share']['image']:.0f}%")
            results[args.fusion]["explanations"] = expl
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        _log(rank, f"wrote {args.json}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
