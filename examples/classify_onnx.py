"""Classify one (text, image) pair with a model.onnx written by `mmrnn-train --eval CKPT --export DIR`,
in ONNX Runtime alone (no torch, no mmrnn_ext):

    python examples/classify_onnx.py DIR/model.onnx "the digit is not seven" --digit 17
    python examples/classify_onnx.py DIR/model.onnx "some text" --features feats.npy --row 3

The built-in task's image is an 8x8 digit's 64 pixels in [0, 1]: --digit K takes scikit-learn's
load_digits() image K. A model trained on your data takes a row of your --features .npy file.
Tokenisation is the checkpoint vocabulary's (stored in the file): lower-case, split on whitespace,
an unknown word is <unk>.
"""
import argparse
import json
import sys

import numpy as np

INPUTS = ["tokens", "lengths", "image"]


def load(path):
    """-> (session, vocab, labels, image width); exits with one line for a file that is not an
    mmrnn-train export (another model's inputs, or no vocabulary in its metadata)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own message, on one line
        sys.exit(f"classify_onnx: {path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}")
    names = [i.name for i in session.get_inputs()]
    meta = session.get_modelmeta().custom_metadata_map
    if names != INPUTS or "mmrnn.vocab" not in meta:
        sys.exit(f"classify_onnx: {path}: expected an mmrnn-train export with inputs {INPUTS} (token ids, "
                 f"lengths, image features) and its vocabulary in the metadata, got inputs {names}")
    width = session.get_inputs()[2].shape[1]
    return session, json.loads(meta["mmrnn.vocab"]), json.loads(meta["mmrnn.labels"]), width


def classify(session, vocab, labels, text, image):
    """-> (label, {label: probability}) for one text and its image features [F]."""
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, 1) for w in text.lower().split()]  # 1 = <unk>
    if not ids:
        sys.exit("classify_onnx: TEXT: expected at least one word")
    scores = session.run(None, {"tokens": np.array([ids], dtype=np.int64),
                                "lengths": np.array([len(ids)], dtype=np.int64),
                                "image": np.asarray(image, dtype=np.float32)[None]})[0][0]
    p = np.exp(scores - scores.max())
    p /= p.sum()
    return labels[int(p.argmax())], dict(zip(labels, p.round(4).tolist()))


def read_features(path):
    """--features: a 2-D numeric .npy [num_images, F]; anything else exits with one line."""
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # missing, unreadable, truncated, not a .npy, pickled objects
        sys.exit(f"classify_onnx: --features {path}: cannot read it as a .npy array ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0] if str(exc) else 'empty or truncated file'})")
    if not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.dtype.kind not in "fiu":
        what = f"a {feats.ndim}-D {feats.dtype} array" if isinstance(feats, np.ndarray) else type(feats).__name__
        sys.exit(f"classify_onnx: --features {path}: expected a 2-D numeric array [num_images, F], got {what}")
    return feats


def parse_args(argv, doc, kind):
    """The arguments both classify examples take (kind: "model.onnx" or "model.pt2")."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("model", help=f"{kind} from mmrnn-train --export")
    ap.add_argument("text")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--digit", type=int, help="scikit-learn load_digits() image index (the built-in task)")
    src.add_argument("--features", help=".npy of image features [num_images, F] (your data)")
    ap.add_argument("--row", type=int, default=0, help="with --features: the row to use")
    return ap.parse_args(argv)


def pick_image(args):
    """The image features the arguments name: a digit's 64 pixels in [0, 1], or a --features row."""
    if args.digit is not None:
        from sklearn.datasets import load_digits

        images = load_digits().images
        if not 0 <= args.digit < len(images):
            sys.exit(f"classify_onnx: --digit: expected an index in [0, {len(images) - 1}], got {args.digit}")
        return images[args.digit].reshape(-1) / 16.0
    feats = read_features(args.features)
    if not 0 <= args.row < len(feats):
        sys.exit(f"classify_onnx: --row: expected an index in [0, {len(feats) - 1}], got {args.row}")
    return feats[args.row]


def main(argv=None):
    args = parse_args(argv, __doc__, "model.onnx")
    session, vocab, labels, width = load(args.model)
    image = pick_image(args)
    if image.shape != (width,):
        sys.exit(f"classify_onnx: the model takes {width} image features, the image gives {image.shape[0]}")
    label, probs = classify(session, vocab, labels, args.text, image)
    print(f"{label}  {probs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
