"""Classify one (text, image) pair with a model.pt2 (or model.onnx) written by `mmrnn-train --eval CKPT
--export DIR`, loaded with mmrnn_ext.load_exported — every call checked against the input contract the
file carries (token ids, lengths, image width and dtype), so a wrong input is one error naming it,
never made-up scores:

    python examples/classify_exported.py DIR/model.pt2 "the digit is not seven" --digit 17
    python examples/classify_exported.py DIR/model.pt2 "some text" --features feats.npy --row 3

The .pt2 package needs torch and mmrnn_ext (its graph calls mmrnn_ext's kernels); for ONNX Runtime
alone see classify_onnx.py.
"""
import argparse
import json
import sys

import torch

import mmrnn_ext
from classify_onnx import read_features


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model.pt2 (or model.onnx) from mmrnn-train --export")
    ap.add_argument("text")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--digit", type=int, help="scikit-learn load_digits() image index (the built-in task)")
    src.add_argument("--features", help=".npy of image features [num_images, F] (your data)")
    ap.add_argument("--row", type=int, default=0, help="with --features: the row to use")
    args = ap.parse_args(argv)
    try:
        model = mmrnn_ext.load_exported(args.model)
    except mmrnn_ext.InputError as exc:
        sys.exit(f"classify_exported: {exc}")
    if "mmrnn.vocab" not in model.metadata:
        sys.exit(f"classify_exported: {args.model}: no vocabulary in its metadata: not an mmrnn-train export")
    vocab, labels = json.loads(model.metadata["mmrnn.vocab"]), json.loads(model.metadata["mmrnn.labels"])
    if args.digit is not None:
        from sklearn.datasets import load_digits

        images = load_digits().images
        if not 0 <= args.digit < len(images):
            sys.exit(f"classify_exported: --digit: expected an index in [0, {len(images) - 1}], got {args.digit}")
        image = torch.tensor(images[args.digit].reshape(-1) / 16.0, dtype=torch.float32)
    else:
        feats = read_features(args.features)
        if not 0 <= args.row < len(feats):
            sys.exit(f"classify_exported: --row: expected an index in [0, {len(feats) - 1}], got {args.row}")
        image = torch.from_numpy(feats[args.row]).float()
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, 1) for w in args.text.lower().split()]  # 1 = <unk>
    if not ids:
        sys.exit("classify_exported: TEXT: expected at least one word")
    try:  # the image width (and everything else) is checked against the model's own contract
        scores = model(torch.tensor([ids]), torch.tensor([len(ids)]), image[None])
    except mmrnn_ext.InputError as exc:
        sys.exit(f"classify_exported: {exc}")
    p = torch.softmax(scores[0].double(), -1)
    print(f"{labels[int(p.argmax())]}  {dict(zip(labels, p.round(decimals=4).tolist()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
