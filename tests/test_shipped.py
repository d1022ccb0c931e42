"""mmrnn_ext.load_exported: a shipped model.pt2 / model.onnx refuses bad input with one error naming
the input (never scores), runs every valid input as eager does (batch 1, one token, column
slices), and turns AOTInductor's own input check into a message naming the input."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import mmrnn_ext
from mmrnn_ext import InputError
from mmrnn_ext.shipped import SPEC_KEY, input_spec

pytestmark = pytest.mark.slow  # exports a model first (ONNX, AOTInductor): the quick lane leaves it out

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ["pt2", "onnx"]


def _model_and_eager(exported):
    from mmrnn_ext import train

    root, _ = exported
    model = train.load_checkpoint(str(root / "run" / "model.pt"))[0].eval()
    return root, model


def _good(gen):
    tokens = torch.randint(1, 20, (3, 6), generator=gen)
    return tokens, torch.tensor([6, 2, 4]), torch.rand(3, 64, generator=gen)


@pytest.mark.parametrize("kind", KINDS)
def test_valid_input_matches_eager(exported, kind):
    root, model = _model_and_eager(exported)
    shipped = mmrnn_ext.load_exported(root / "ship" / f"model.{kind}")
    assert shipped.input_names == ["tokens", "lengths", "image"] and shipped.kind == kind
    gen = torch.Generator().manual_seed(0)
    t, n, v = _good(gen)
    wide = torch.rand(3, 128, generator=gen)
    cases = {"as given": (t, n, v), "batch 1": (t[:1], n[:1], v[:1]), "one token": (t[:, :1], torch.ones(3, dtype=torch.long), v),
             "length 0": (t, torch.tensor([6, 0, 1]), v), "column slices": (t[:, :4], n.clamp(max=4), wide[:, ::2]),
             "by name": (t, n, v)}
    for what, args in cases.items():
        with torch.no_grad():
            want = model(*args)
        got = shipped(**dict(zip(shipped.input_names, args))) if what == "by name" else shipped(*args)
        assert (got - want).abs().max().item() <= 1e-5, what


BAD = [  # (what, make(tokens, lengths, image) -> inputs, the input the message must name, words it must hold)
    ("image one column narrower", lambda t, n, v: (t, n, v[:, :63]), "image", ["64", "63"]),
    ("image one column wider", lambda t, n, v: (t, n, torch.cat([v, v[:, :1]], 1)), "image", ["64", "65"]),
    ("float64 image", lambda t, n, v: (t, n, v.double()), "image", ["float32", "float64"]),
    ("int32 tokens", lambda t, n, v: (t.int(), n, v), "tokens", ["int64", "int32"]),
    ("float tokens", lambda t, n, v: (t.float(), n, v), "tokens", ["int64", "float32"]),
    ("lengths past the steps", lambda t, n, v: (t, torch.tensor([7, 2, 4]), v), "lengths", ["[0, steps = 6]", "7"]),
    ("negative length", lambda t, n, v: (t, torch.tensor([6, -1, 4]), v), "lengths", ["-1"]),
    ("lengths of another batch", lambda t, n, v: (t, n[:2], v), "lengths", ["batch = 3", "2"]),
    ("image of another batch", lambda t, n, v: (t, n, v[:2]), "image", ["batch = 3", "2"]),
    ("token past the vocabulary", lambda t, n, v: (t + 10 ** 6, n, v), "tokens", ["expected values in [0,"]),
    ("one image for the batch", lambda t, n, v: (t, n, v[0]), "image", ["2 dims", "1 dims"]),
    ("int32 lengths", lambda t, n, v: (t, n.int(), v), "lengths", ["int64", "int32"]),
    ("a list for the image", lambda t, n, v: (t, n, v.tolist()), "image", ["torch.Tensor", "list"]),
    ("two inputs", lambda t, n, v: (t, n), "image", ["missing"]),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what,make,name,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_naming_it(exported, kind, what, make, name, words):
    root, _ = exported
    shipped = mmrnn_ext.load_exported(root / "ship" / f"model.{kind}")
    with pytest.raises(InputError) as info:
        shipped(*make(*_good(torch.Generator().manual_seed(1))))
    msg = str(info.value)
    assert msg.startswith(name + ":") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def _tiny_package(tmp_path, metadata=None):
    """An AOTInductor package of a 1-layer mmrnn_ext.GRU over (x [B, 5], image [B, 3])."""
    torch.manual_seed(2)
    gru = mmrnn_ext.GRU(5, 4, image_size=3, batch_first=True).eval()

    class M(torch.nn.Module):
        def forward(self, x, image):
            return gru(x, image=image)[0]

    m = M()
    args = (torch.randn(2, 4, 5), torch.randn(2, 3))
    B = torch.export.Dim("B", min=1)
    ep = torch.export.export(m, args, dynamic_shapes=({0: B}, {0: B}))
    configs = {"aot_inductor.check_lowerbound": False}
    if metadata is not None:
        configs["aot_inductor.metadata"] = metadata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m, torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"),
                                                           inductor_configs=configs)


def test_aot_inductor_check_named_by_input(tmp_path):
    """A contract looser than the package (any image width) lets AOTInductor's own check catch the
    width: its 'input_handles[1]' becomes the input's name."""
    loose = input_spec([{"name": "x", "dtype": "float32", "shape": ["batch", 4, 5]},
                        {"name": "image", "dtype": "float32", "shape": ["batch", "width"]}])
    m, path = _tiny_package(tmp_path, {SPEC_KEY: loose})
    shipped = mmrnn_ext.load_exported(path)
    x, v = torch.randn(3, 4, 5), torch.randn(3, 3)
    with torch.no_grad():
        assert (shipped(x, v) - m(x, v)).abs().max().item() <= 1e-6
    with pytest.raises(InputError) as info:
        shipped(x, torch.randn(3, 4))
    msg = str(info.value)
    assert msg.startswith("image:") and "expected: 3, but got: 4" in msg and "AOTInductor" in msg and "\n" not in msg


def test_package_without_a_contract_is_refused(tmp_path):
    _, path = _tiny_package(tmp_path)
    with pytest.raises(InputError, match="no input contract"):
        mmrnn_ext.load_exported(path)


@pytest.mark.parametrize("path,words", [("missing.pt2", "no such file"), ("model.txt", "ending in .pt2")])
def test_load_exported_bad_path(tmp_path, path, words):
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(InputError, match=words):
        mmrnn_ext.load_exported(tmp_path / path)


def test_input_spec_refuses_a_malformed_contract():
    with pytest.raises(ValueError, match="dtype"):
        input_spec([{"name": "x", "dtype": "float", "shape": [1]}])
    with pytest.raises(ValueError, match="twice"):
        input_spec([{"name": "x", "dtype": "float32", "shape": [1]}] * 2)


# --- the examples ---------------------------------------------------------------------------------------

def _example(script, *argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *argv], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def test_pt2_example_classifies_and_refuses_a_wrong_width(exported, tmp_path):
    import numpy as np

    root, _ = exported
    proc = _example("classify_exported.py", str(root / "ship" / "model.pt2"), "the digit is not seven", "--digit", "17")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("  ", 1)[0] in ("true", "false")
    np.save(tmp_path / "w65.npy", np.random.rand(2, 65).astype(np.float32))
    proc = _example("classify_exported.py", str(root / "ship" / "model.pt2"), "the digit is seven", "--features",
                    str(tmp_path / "w65.npy"))
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "\n" not in err and "image: expected size 64" in err and "65" in err
    assert proc.stdout == ""


@pytest.mark.parametrize("content,words", [(b"", "cannot read it"), (b"not an array", "cannot read it"),
                                           (None, "expected a 2-D numeric array")])
def test_onnx_example_unreadable_features_one_line(exported, tmp_path, content, words):
    import numpy as np

    root, _ = exported
    path = tmp_path / "f.npy"
    if content is None:
        np.save(path, np.zeros(64))
    else:
        path.write_bytes(content)
    proc = _example("classify_onnx.py", str(root / "ship" / "model.onnx"), "the digit is seven", "--features", str(path))
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "\n" not in err and err.startswith("classify_onnx: --features") and words in err, err
