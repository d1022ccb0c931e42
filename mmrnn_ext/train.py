"""mmrnn-train: train and evaluate a multimodal (text + image) classifier on mmrnn_ext.RNN, LSTM or GRU.

    mmrnn-train --quick                      the built-in digits-and-statements task, fusion "add"
    mmrnn-train --quick --cell lstm --gap 100    the same with 100 filler words after the negation
    mmrnn-train --quick --ablate --json m.json   + text-only / image-only baselines and every fusion mode
    mmrnn-train --quick --sweep-gaps 0,25,50,100,200 --cells rnn,lstm,gru --json s.json --plot s.png
    mmrnn-train --data my.jsonl --features feats.npy   your own data (see mmrnn_ext.data)
    mmrnn-train --eval runs/mmrnn-train/model.pt       evaluate a checkpoint on its own test split
    mmrnn-train --quick --explain 4          Integrated Gradients: a PNG per test example

Writes under --out (default runs/mmrnn-train): model.pt (weights, vocabulary, labels, config and
the data's record, sealed with a content digest; loaded with torch.load(weights_only=True), so a
checkpoint is data, never code), curves.png, confusion.png, explain_*.png. Metrics come from
scikit-learn. Launched by torchrun (WORLD_SIZE > 1) it trains with DistributedDataParallel, each
process on its share of every batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import _cli
from .models import CELLS, FUSION_HELP, FUSIONS, MultimodalClassifier

# numpy, scikit-learn, matplotlib (the "train" extra) and captum (--explain) are imported where they
# are used, after main() has checked that they are installed: --help works with the core install.

CHECKPOINT_FORMAT = "mmrnn-train/2"
ABLATION = ("add", "concat", "init", "late", "text_only", "image_only")
PROG = "mmrnn-train"
DEFAULT_CELL = "rnn"
CELL_HELP = ("the recurrent cell (default rnn: on the built-in task at gap 0 with --quick it reached 0.9723 mean, "
             "0.9668 minimum test accuracy over seeds 0-4, the LSTM 0.8849 mean with one seed of five stopped early "
             "at chance; the LSTM and GRU keep the negation across long gaps where the tanh RNN fails: README, "
             "'Long gaps')")


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
        backend=config["backend"], cell=config["cell"])


def _batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size][rank::world]


def evaluate(model, split, device, batch_size=1024) -> dict:
    import numpy as np
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


CURRICULUM_ADVANCE = 0.9  # validation accuracy on a stage's gap that moves training to the next stage


def curriculum_gaps(gap: int) -> list:
    """The stages before the target gap: 0, gap/8, gap/4, gap/2 (distinct, below gap)."""
    return sorted({g for g in (0, gap // 8, gap // 4, gap // 2) if g < gap}) if gap > 0 else []


def train(dataset, config: dict, args, device, rank=0, world=1, progress=True, log_every=None, stages=()):
    """-> (model, history, steps) with the best validation weights restored. history: per epoch
    train loss/accuracy, the gap trained on and validation accuracy; steps: every optimisation
    step's training loss.

    stages: a curriculum, [(gap, Dataset)] before `dataset` (the same examples with shorter gaps):
    training starts on the first and moves to the next once its validation accuracy reaches
    CURRICULUM_ADVANCE. The weights kept are always the best on `dataset`'s own validation split;
    early stopping counts only epochs on `dataset` itself."""
    torch.manual_seed(config["seed"])
    model = build_model(config)
    if model.encoder is not None:
        model.encoder.fit(dataset.train.images)
    model = model.to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    gen = torch.Generator().manual_seed(config["seed"])
    stages = list(stages) + [(config.get("gap", 0), dataset)]
    stage = 0
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
        gap, current = stages[stage]
        tr = current.train
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
        history.append({"epoch": epoch + 1, "gap": gap, "train_loss": total / max(1, seen),
                        "train_accuracy": correct / max(1, seen), "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        at_target = stage == len(stages) - 1
        if not at_target:
            history[-1]["stage_val_accuracy"] = evaluate(model, current.val, device)["accuracy"]
            stage += history[-1]["stage_val_accuracy"] >= CURRICULUM_ADVANCE
        if bar is not None:
            bar.set_postfix(loss=f"{total / max(1, seen):.3f}", acc=f"{correct / max(1, seen):.3f}",
                            val=f"{val['accuracy']:.3f}", gap=gap)
            bar.update(1)
        if val["accuracy"] > best:
            best, stale = val["accuracy"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif at_target:
            stale += 1
        if stale >= config["patience"] or (args.max_steps and len(steps) >= args.max_steps):
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history, steps


# --- checkpoints ---------------------------------------------------------------------------------

def content_digest(meta: dict, state_dict: dict) -> str:
    """sha256 over the metadata (JSON, sorted keys) and every stored tensor's name, dtype, shape and
    bytes: any changed byte of what a checkpoint holds changes it."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, config, dataset):
    """model.pt: weights, vocabulary, labels, config and what evaluation needs to rebuild the test
    split (the data's kind, seed, split rule, file fingerprints, the test split's digest), sealed
    with a content digest that load_checkpoint verifies."""
    from .data import split_digest

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "config": config, "vocab": list(dataset.vocab),
            "labels": list(dataset.labels), "data": dict(dataset.source, test_digest=split_digest(dataset.test))}
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(dict(meta, state_dict=state, digest=content_digest(meta, state)), path)


def load_checkpoint(path, device="cpu", backend=None):
    """-> (model, config, vocab, labels, data). A checkpoint is data: torch.load(weights_only=True);
    its content digest must match what it holds. Every failure is a one-line ValueError. backend:
    how to run the model here (default: as it was trained); the backend is not part of the model, so
    a checkpoint trained on a GPU's Triton kernels evaluates on a CPU and back."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r}: the file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # never repeat torch's advice to load without weights_only
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function
            raise ValueError(f"checkpoint {path!r}: holds Python objects other than tensors and plain data; "
                             "mmrnn-train loads checkpoints as data only, never code, and refuses it") from None
        raise ValueError(f"checkpoint {path!r} cannot be read: not a complete torch checkpoint (truncated or "
                         f"damaged; {type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path!r}: expected format {CHECKPOINT_FORMAT!r}, got {found!r}"
                         + (" (written by an earlier mmrnn-train: retrain it)" if str(found).startswith("mmrnn-train/") else ""))
    keys = ("format", "config", "vocab", "labels", "data", "state_dict", "digest")
    if set(ckpt) != set(keys) or not isinstance(ckpt["state_dict"], dict):
        raise ValueError(f"checkpoint {path!r}: expected the entries {list(keys)}, got {sorted(ckpt)}")
    meta = {k: ckpt[k] for k in keys if k not in ("state_dict", "digest")}
    try:
        digest = content_digest(meta, ckpt["state_dict"])
    except (TypeError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {path!r}: malformed contents ({type(exc).__name__})") from None
    if digest != ckpt["digest"]:
        raise ValueError(f"checkpoint {path!r}: content digest mismatch: its weights or metadata changed after it "
                         "was saved (damaged or edited)")
    config = ckpt["config"]
    model = build_model(config if backend is None else dict(config, backend=backend))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit its own config: {str(exc)[:300]}") from None
    return model.to(device), config, ckpt["vocab"], ckpt["labels"], ckpt["data"]


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
    import numpy as np

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
    import numpy as np

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

        # a baseline reads one input only: the other gets no attribution (exactly 0), and Integrated
        # Gradients runs over the input the model reads
        if model.fusion == "text_only":
            ig = IntegratedGradients(lambda e: model.forward_embedded(e, lens.expand(e.shape[0]), img.expand(e.shape[0], -1)))
            a_emb = ig.attribute(emb, baselines=torch.zeros_like(emb), target=pred, n_steps=32)
            a_img = torch.zeros_like(img)
        elif model.fusion == "image_only":
            ig = IntegratedGradients(lambda im: model.forward_embedded(emb.expand(im.shape[0], -1, -1),
                                                                       lens.expand(im.shape[0]), im))
            a_img = ig.attribute(img, baselines=torch.zeros_like(img), target=pred, n_steps=32)
            a_emb = torch.zeros_like(emb)
        else:
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
        # long texts (a long --gap) wrap onto as many lines as they need, in a smaller font
        n_lines = max(1, int(np.ceil(sum(len(w) + 2 for w in words) / 75)))
        font = 13 if n_lines == 1 else 9
        fig, (ax_t, ax_i) = plt.subplots(1, 2, figsize=(10, max(3.0, 1.2 + 0.32 * n_lines)),
                                         gridspec_kw={"width_ratios": [3, 1]})
        scale = max(1e-12, np.abs(tok_attr).max())
        renderer = fig.canvas.get_renderer()
        x, y = 0.02, 0.5 if n_lines == 1 else 0.97
        line_height = 0.94 / n_lines if n_lines > 1 else 0
        for w, a in zip(words, tok_attr):
            color = plt.cm.RdBu(0.5 + 0.5 * a / scale)
            t = ax_t.text(x, y, w, fontsize=font, va="center", bbox=dict(facecolor=color, edgecolor="none", pad=2))
            bb = t.get_window_extent(renderer=renderer).transformed(ax_t.transAxes.inverted())
            if bb.x1 > 1.0 and x > 0.02:  # wrap: move the word to the next line
                x, y = 0.02, y - line_height
                t.set_position((x, y))
                bb = t.get_window_extent(renderer=renderer).transformed(ax_t.transAxes.inverted())
            x = bb.x1 + 0.015
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
    args.seeds = _int_list(p, "--seeds", args.seeds, minimum=0)
    if args.seeds is not None:
        if args.seed is not None:
            p.error("argument --seeds: not with --seed")
    if (args.data is None) != (args.features is None):
        p.error("--data and --features go together: records (.jsonl/.csv) and their image features (.npy)")
    if args.eval:
        given = _given_options(p, argv)
        for flag in ("seeds", "explain", "ablate"):
            if getattr(args, flag):
                p.error(f"--eval: not with --{flag} (evaluation reuses the checkpoint's model, seed and split)")
        for dest in EVAL_FIXED:
            if dest in given:
                flag = "--" + dest.replace("_", "-")
                p.error(f"--eval: not with {flag} (the checkpoint fixes the model and how it was trained; "
                        "--eval takes --gap, --backend, --device, --json and, for your data, --data/--features)")
        args.eval_gap = args.gap if "gap" in given else None
    return args


# What a checkpoint fixes: given with --eval, each is refused by name rather than silently ignored.
EVAL_FIXED = ("fusion", "cell", "embed", "hidden", "layers", "bidirectional", "dropout", "epochs", "patience",
              "batch_size", "lr", "max_steps", "no_curriculum", "quick", "out", "sweep_gaps", "cells", "plot")


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
    _cli.writable_file(PROG, "--plot", args.plot)
    if not args.eval:
        _cli.writable_folder(PROG, "--out", args.out)
    return device


def _check_backend(backend: str, device: torch.device) -> None:
    """--backend must run here (on --device), checked before any data is loaded: one line otherwise."""
    if backend == "auto":
        return
    from . import _backends

    status = _backends.backends()[backend]
    if not status["available"]:
        raise SystemExit(f"{PROG}: --backend {backend}: not available here: {status['detail']}")
    try:
        _backends.select(backend, device, torch.float32, "rnn")
    except (RuntimeError, TypeError) as exc:
        raise SystemExit(f"{PROG}: --backend {backend}: {str(exc).splitlines()[0]}") from None


def _load_data(args, seed, gap=0):
    from . import data as data_mod

    if args.data:
        return data_mod.load_user_data(args.data, args.features, seed), None
    return data_mod.digits_task(seed, gap), "digits"


def _curriculum(args, ds, seed, gap):
    """[(gap, Dataset)] for the stages before `gap` (the same examples, encoded with ds's vocabulary)."""
    from . import data as data_mod

    if args.data or args.no_curriculum:
        return []
    stages = []
    for g in curriculum_gaps(gap):
        stages.append((g, data_mod.reencode(data_mod.digits_task(seed, g), ds.vocab)))
    return stages


def _load_eval_data(args, path, config, vocab, labels, source):
    """The checkpoint's test split, rebuilt from its record of the data; refuses when the data given
    are not the data it was trained and tested on."""
    from . import data as data_mod

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


def _report(name, metrics, labels):
    cm = metrics["confusion_matrix"]
    lines = [f"[{name}] test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
             "  confusion matrix (rows: true, columns: predicted; " + ", ".join(labels) + "):"]
    lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in cm]
    return "\n".join(lines)


def _evaluate_checkpoint(args, device, rank):
    from .data import DataError

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
        from . import data as data_mod

        gap = args.eval_gap
        ds = data_mod.reencode(data_mod.digits_task(source["seed"], gap), vocab)
        _log(rank, f"note: evaluating at gap {gap}; the checkpoint was trained at gap {trained_gap} (same test "
                   "statements, images and labels)")
    metrics = evaluate(model, ds.test, device)
    _log(rank, _report(f"{config['fusion']}, {config['cell']}" + (f", gap {gap}" if gap else ""), metrics, labels))
    return {config["fusion"]: {"test_accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                               "confusion_matrix": metrics["confusion_matrix"], "seed": source["seed"],
                               "cell": config["cell"], "gap": gap, "trained_gap": trained_gap,
                               "backend": args.backend}}


def _train_variants(args, device, rank, world, seed, suffix_seed, cell=None, gap=None, variants=None, out_suffix=""):
    """Train every requested variant on one seed's split -> ({variant: metrics}, dataset, main model)."""
    cell = cell or args.cell
    gap = args.gap if gap is None else gap
    ds, encoder = _load_data(args, seed, gap)
    for note in ds.notes:
        _log(rank, f"note: {note}")
    stages = _curriculum(args, ds, seed, gap)
    epochs = args.epochs or (30 if args.quick else 60)
    patience = args.patience or (5 if args.quick else 8)
    results, main_model = {}, None
    for fusion in variants or (ABLATION if args.ablate else (args.fusion,)):
        config = {"vocab_size": len(ds.vocab), "num_classes": len(ds.labels), "image_dim": ds.image_dim,
                  "embed_dim": args.embed, "hidden_size": args.hidden, "num_layers": args.layers,
                  "bidirectional": args.bidirectional, "dropout": args.dropout, "fusion": fusion, "cell": cell,
                  "gap": gap, "image_encoder": encoder, "backend": args.backend,
                  "seed": seed, "lr": args.lr, "batch_size": args.batch_size, "epochs": epochs, "patience": patience}
        # the baselines cannot learn the interaction a curriculum stage waits for: no curriculum
        config["curriculum"] = [] if fusion in ("text_only", "image_only") else [g for g, _ in stages]
        start = time.time()
        model, history, _ = train(ds, config, args, device, rank, world,
                                  stages=[st for st in stages if st[0] in config["curriculum"]])
        metrics = evaluate(model, ds.test, device)
        seconds = time.time() - start
        reached = max(h["gap"] for h in history)
        _log(rank, _report(f"{fusion}, {cell}" + (f", gap {gap}" if gap else ""), metrics, ds.labels)
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
                r, _, _ = _train_variants(args, device, rank, world, seed, len(seeds) > 1, cell=cell, gap=gap,
                                          variants=(fusion,), out_suffix=f"_{key}_gap{gap}")
                per_seed[seed] = {fusion: {k: v for k, v in r[fusion].items() if k != "history"} | {"fusion": fusion}}
            result[key][str(gap)] = (per_seed[seeds[0]][fusion] if len(seeds) == 1
                                     else _over_seeds(per_seed)[fusion] | {"cell": cell, "gap": gap, "fusion": fusion})
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean (min) over seeds {','.join(map(str, seeds))}"
    _log(rank, f"\nsweep (test accuracy, {which}; fusion {args.fusion} for the cells):")
    _log(rank, "  " + f"{'gap':<12}" + "".join(f"{g:>17}" for g in args.sweep_gaps))
    for key, per_gap in result.items():
        cells_text = [f"{m['test_accuracy']:.4f}" + (f" ({m['test_accuracy_min']:.4f})" if len(seeds) > 1 else "")
                      for m in (per_gap[str(g)] for g in args.sweep_gaps)]
        _log(rank, "  " + f"{key:<12}" + "".join(f"{c:>17}" for c in cells_text))
    return result


def plot_sweep(result: dict, path: str, title: str, chance: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, per_gap in result.items():
        gaps = sorted(per_gap, key=int)
        style = "--" if key in ("text_only", "image_only") else "-"
        line, = ax.plot([int(g) for g in gaps], [per_gap[g]["test_accuracy"] for g in gaps], style, marker="o",
                        label=key + (" (mean; dots: seeds)" if "seeds" in per_gap[gaps[0]] else ""))
        for g in gaps:  # with --seeds: each seed's accuracy as a dot around the mean
            for r in per_gap[g].get("seeds", {}).values():
                ax.plot(int(g), r["test_accuracy"], ".", color=line.get_color(), alpha=0.5)
    ax.axhline(chance, color="gray", linestyle=":", label=f"chance ({chance:.2f})")
    ax.set_xlabel("gap (filler words between the negation and the rest of the statement)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _over_seeds(per_seed: dict) -> dict:
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


def main(argv=None) -> int:
    args = parse_args(argv)
    device = _check_environment(args)
    rank, world = _dist_setup(device)
    if args.eval:
        results = _evaluate_checkpoint(args, device, rank)
    elif args.sweep_gaps is not None:
        results = sweep(args, device, rank, world)
        if args.plot and rank == 0:
            plot_sweep(results, args.plot, f"mmrnn-train --quick, fusion {args.fusion}: accuracy against gap"
                       if args.quick else f"fusion {args.fusion}: accuracy against gap", chance=0.5)
            _log(rank, f"wrote {args.plot}")
    else:
        from .data import DataError

        seeds = args.seeds or [0 if args.seed is None else args.seed]
        per_seed = {}
        try:
            for seed in seeds:
                per_seed[seed], ds, main_model = _train_variants(args, device, rank, world, seed, len(seeds) > 1)
        except DataError as exc:
            raise SystemExit(f"{PROG}: {exc}") from None
        results = per_seed[seeds[0]] if len(seeds) == 1 else _over_seeds(per_seed)
        if args.ablate or len(seeds) > 1:
            label = "mean (min)" if len(seeds) > 1 else ""
            _log(rank, f"\nsummary (test split{', seeds ' + ','.join(map(str, seeds)) if len(seeds) > 1 else ''}):"
                 f"\n  variant      accuracy {label}  macro-F1 {label}")
            for name, r in results.items():
                mins = (f" ({r['test_accuracy_min']:.4f})", f" ({r['macro_f1_min']:.4f})") if len(seeds) > 1 else ("", "")
                _log(rank, f"  {name:<12} {r['test_accuracy']:.4f}{mins[0]}    {r['macro_f1']:.4f}{mins[1]}")
        if args.explain and rank == 0:
            import numpy as np

            n = min(args.explain, len(ds.test))
            picks = np.random.default_rng(seeds[-1]).choice(len(ds.test), size=n, replace=False)
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

        dist.barrier()  # every rank done (rank 0 writes files) before the process group is torn down
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
