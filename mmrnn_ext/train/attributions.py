"""mmrnn-train --explain: Integrated Gradients (Captum) over token embeddings and image inputs, a PNG
per test example."""
from __future__ import annotations

import os

import torch


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
