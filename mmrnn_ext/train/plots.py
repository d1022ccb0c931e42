"""mmrnn-train's figures: training curves, the confusion matrix, accuracy against gap (matplotlib,
imported where used: --help works with the core install)."""
from __future__ import annotations


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
