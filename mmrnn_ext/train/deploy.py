"""mmrnn-train --eval CKPT --export DIR: the whole classifier (token ids + lengths + image features in,
class scores out; the built-in task's image encoder included) written as

    DIR/model.onnx   torch.onnx.export(dynamo=True): runs in ONNX Runtime (CPUExecutionProvider)
    DIR/model.pt2    torch.export + AOTInductor: torch._inductor.aoti_load_package (mmrnn_ext imported)

both with a dynamic batch and length, then checked against eager on the checkpoint's test split:
the largest difference in any class score and the accuracy each reaches are printed, and the export
is refused (files removed, one line) when they disagree. model.onnx carries what a server needs to
feed it in its metadata: the vocabulary, the labels, the tokenizer rule and the image width
(examples/classify_onnx.py reads them).
"""
from __future__ import annotations

import json
import os

import torch

from ..shipped import load_exported
from .loop import PROG, log

INPUTS = ("tokens", "lengths", "image")  # the exported graph's inputs, in order
TOLERANCE = 1e-4  # largest |score difference| (float32) accepted between an export and eager
METADATA_KEYS = ("mmrnn.inputs", "mmrnn.vocab", "mmrnn.labels", "mmrnn.tokenizer", "mmrnn.image", "mmrnn.spec")


class _Classifier(torch.nn.Module):
    """The classifier with the graph's input names (tokens, lengths, image)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths, image):
        return self.model(tokens, lengths, image)


def _example(split, n=4):
    """A few test rows, cut to their longest length (the export traces these; every size is dynamic)."""
    L = int(split.lengths[:n].max())
    return split.tokens[:n, :L].contiguous(), split.lengths[:n].contiguous(), split.images[:n].contiguous()


def _dynamic_shapes():
    from torch.export import Dim

    batch, steps = Dim("batch", min=1), Dim("steps", min=1)
    return {"tokens": {0: batch, 1: steps}, "lengths": {0: batch}, "image": {0: batch}}


def _spec(config, vocab) -> str:
    """The input contract mmrnn_ext.load_exported checks every call against."""
    from ..shipped import input_spec

    return input_spec([{"name": "tokens", "dtype": "int64", "shape": ["batch", "steps"], "min": 0, "max": len(vocab) - 1},
                       {"name": "lengths", "dtype": "int64", "shape": ["batch"], "min": 0, "max": "steps"},
                       {"name": "image", "dtype": "float32", "shape": ["batch", int(config["image_dim"])]}])


def _metadata(config, vocab, labels, source) -> dict:
    image = ("64 pixel intensities of an 8x8 digit, row by row, in [0, 1] (scikit-learn's load_digits() "
             "images / 16)" if source.get("kind") == "digits" else
             f"{config['image_dim']} image features, as in the --features file the model was trained on")
    return {"mmrnn.inputs": json.dumps({"tokens": "int64 [batch, steps] token ids, 0-padded",
                                        "lengths": "int64 [batch] valid tokens per row",
                                        "image": f"float32 [batch, {config['image_dim']}]"}),
            "mmrnn.vocab": json.dumps(list(vocab)), "mmrnn.labels": json.dumps(list(labels)),
            "mmrnn.tokenizer": "text.lower().split(); a word not in mmrnn.vocab is <unk> (id 1), padding is id 0",
            "mmrnn.image": image, "mmrnn.spec": _spec(config, vocab)}


def _batches(split, size=512):
    """The split in batches cut to their longest row (column slices: load_exported makes them
    contiguous, as an AOTInductor package needs)."""
    for i in range(0, len(split), size):
        n = int(split.lengths[i:i + size].max())
        yield split.tokens[i:i + size, :n], split.lengths[i:i + size], split.images[i:i + size]


def _scores(run, split) -> torch.Tensor:
    return torch.cat([run(*b) for b in _batches(split)])


def export_classifier(model, config, vocab, labels, source, ds, out_dir, rank=0) -> dict:
    """Write DIR/model.onnx and DIR/model.pt2 of `model` (on the CPU, eval mode), check both against
    eager on ds.test -> {"onnx": {...}, "pt2": {...}, "eager_accuracy": ...}; SystemExit when an
    export disagrees with eager."""
    import onnx

    os.makedirs(out_dir, exist_ok=True)
    net = _Classifier(model.to("cpu").eval()).eval()
    example = _example(ds.test)
    onnx_path, pt2_path = os.path.join(out_dir, "model.onnx"), os.path.join(out_dir, "model.pt2")

    log(rank, f"exporting to {onnx_path} (torch.onnx.export, dynamo) ...")
    program = torch.onnx.export(net, example, dynamo=True, dynamic_shapes=_dynamic_shapes(), input_names=list(INPUTS),
                                output_names=["scores"], verbose=False)
    program.save(onnx_path)
    proto = onnx.load(onnx_path)
    metadata = _metadata(config, vocab, labels, source)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, onnx_path)

    log(rank, f"exporting to {pt2_path} (torch.export + AOTInductor) ...")
    exported = torch.export.export(net, example, dynamic_shapes=tuple(_dynamic_shapes().values()))
    # the same metadata in the package (load_exported checks calls against its mmrnn.spec); no
    # lower bound of 2 on the dynamic sizes in AOTInductor's own input checks: batch 1 and one
    # token are valid inputs (the graph is traced for any size >= 1)
    torch._inductor.aoti_compile_and_package(exported, package_path=pt2_path, inductor_configs={
        "aot_inductor.metadata": metadata, "aot_inductor.check_lowerbound": False})

    with torch.no_grad():
        eager = _scores(net, ds.test)
        # both through load_exported, as users load them: every batch checked against the contract
        in_onnx = _scores(load_exported(onnx_path), ds.test)
        in_pt2 = _scores(load_exported(pt2_path), ds.test)
    y = ds.test.labels
    result = {"eager_accuracy": float((eager.argmax(-1) == y).float().mean()), "test_examples": len(y)}
    for name, scores, path in (("onnx", in_onnx, onnx_path), ("pt2", in_pt2, pt2_path)):
        result[name] = {"path": path, "max_abs_diff": float((scores - eager).abs().max()),
                        "accuracy": float((scores.argmax(-1) == y).float().mean()),
                        "predictions_differing": int((scores.argmax(-1) != eager.argmax(-1)).sum())}
        log(rank, f"{name}: {path}: largest |score difference| from eager {result[name]['max_abs_diff']:.2e} over "
                  f"{len(y)} test examples; accuracy {result[name]['accuracy']:.4f} (eager {result['eager_accuracy']:.4f})")
    bad = [n for n in ("onnx", "pt2") if not result[n]["max_abs_diff"] <= TOLERANCE]
    if bad:
        for path in (onnx_path, pt2_path):
            os.remove(path)
        raise SystemExit(f"{PROG}: --export: refused: {' and '.join(bad)} disagree with eager on the test split "
                         f"(largest |score difference| {max(result[n]['max_abs_diff'] for n in bad):.2e} > "
                         f"{TOLERANCE:g}); nothing written")
    return result
