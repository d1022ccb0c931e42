import os

import torch

# Without CUDA the Triton kernels are tested through Triton's interpreter on CPU tensors. This must
# be set before anything imports triton; "auto" never picks the interpreter, so other tests are
# unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mmrnn_ext  # noqa: E402

# (dtype, atol, rtol): what the dtype can promise for these sizes, never widened to make a test pass
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}


def require(backend: str) -> None:
    """Skip when `backend` is not available here, unless the run demands it (CI sets
    MMRNN_REQUIRE=cpp,triton so that a missing build fails instead of skipping)."""
    status = mmrnn_ext.backends()[backend]
    if status["available"]:
        return
    required = os.environ.get("MMRNN_REQUIRE", "").split(",")
    if backend in required:
        pytest.fail(f"backend {backend!r} is required by MMRNN_REQUIRE but not available: {status['detail']}")
    pytest.skip(f"backend {backend!r} not available: {status['detail']}")


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{what}: one gradient is None and the other is not"
        return
    diff = (actual.double() - expected.double()).abs()
    if diff.numel():
        print(f"{what}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def gemm_calls(monkeypatch):
    """The input GEMMs a module runs, recorded instead of run: torch's F.linear and the engine's
    input product (which float32 CPU calls take, with or without gradients)."""
    called = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: called.append("F.linear"))
    try:
        from mmrnn_ext import _C
    except ImportError:
        return called
    monkeypatch.setattr(_C, "linear", lambda *a, **k: called.append("engine"))
    return called


@pytest.fixture(params=["reference", "cpp"])
def cpu_backend(request):
    require(request.param)
    return request.param


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A small mmrnn-train GRU trained for 30 steps and shipped with --export (model.onnx + model.pt2)
    -> (root folder, its metrics); shared by the export and load_exported tests."""
    import json

    from mmrnn_ext import train

    root = tmp_path_factory.mktemp("export")
    assert train.main(["--cell", "gru", "--fusion", "add", "--max-steps", "30", "--epochs", "1", "--hidden", "16",
                       "--out", str(root / "run")]) == 0
    out = root / "metrics.json"
    assert train.main(["--eval", str(root / "run" / "model.pt"), "--export", str(root / "ship"), "--json", str(out)]) == 0
    return root, json.load(open(out))["add"]
