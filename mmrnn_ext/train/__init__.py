"""mmrnn-train (mmrnn_ext.train): train, evaluate, explain and ship a multimodal (text + image)
classifier on mmrnn_ext.RNN, LSTM or GRU. One file per concern:

    cli.py           the command line: options, their checks, main()
    loop.py          the training loop: model from config, batches, evaluation, curriculum, torchrun
    sweeps.py        runs: every variant on a seed's split, --seeds, --sweep-gaps
    checkpoints.py   model.pt: save, load (data only), content digest
    evaluation.py    --eval: a checkpoint on the test split it was tested on
    deploy.py        --export: model.onnx and model.pt2 of the whole classifier, verified
    attributions.py  --explain: Integrated Gradients (Captum)
    plots.py         curves, confusion matrix, accuracy against gap
"""
from .checkpoints import CHECKPOINT_FORMAT, content_digest, load_checkpoint, save_checkpoint
from .cli import main, parse_args
from .loop import CURRICULUM_ADVANCE, build_model, curriculum_gaps, evaluate, train

__all__ = ["CHECKPOINT_FORMAT", "CURRICULUM_ADVANCE", "build_model", "content_digest", "curriculum_gaps", "evaluate",
           "load_checkpoint", "main", "parse_args", "save_checkpoint", "train"]
