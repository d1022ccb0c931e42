"""Classify one (text, image) pair with a model.pt2 (or model.onnx) written by `mmrnn-train --eval CKPT
--export DIR`, loaded with mmrnn_ext.load_exported — every call checked against the input contract the
file carries (token ids, lengths, image width and dtype), so a wrong input is one error naming it,
never made-up scores:

    python examples/classify_exported.py DIR/model.pt2 "the digit is not seven" --digit 17
    python examples/classify_exported.py DIR/model.pt2 "some text" --features feats.npy --row 3

The .pt2 package needs torch and mmrnn_ext (its graph calls mmrnn_ext's kernels); for ONNX Runtime
alone see classify_onnx.py.
"""
import json
import sys

import torch

import mmrnn_ext
from classify_onnx import parse_args, pick_image


def main(argv=None):
    args = parse_args(argv, __doc__, "model.pt2 (or model.onnx)")
    try:
        model = mmrnn_ext.load_exported(args.model)
    except mmrnn_ext.InputError as exc:
        sys.exit(f"classify_exported: {exc}")
    if "mmrnn.vocab" not in model.metadata:
        sys.exit(f"classify_exported: {args.model}: no vocabulary in its metadata: not an mmrnn-train export")
    vocab, labels = json.loads(model.metadata["mmrnn.vocab"]), json.loads(model.metadata["mmrnn.labels"])
    # float32, as the model takes it (a float64 .npy row or the digit's pixels / 16)
    image = torch.from_numpy(pick_image(args)).float()
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
