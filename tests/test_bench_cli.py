"""mmrnn-bench end to end on a tiny grid: valid JSON with every provider and both passes, a plot,
and a loud failure when a provider disagrees."""
import json

import pytest
import torch

from mmrnn_ext import bench

TINY = ["--shape", "2,3,4,5,6", "--shape", "1,2,3,2,5", "--device", "cpu", "--repeats", "1"]


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert bench.main(TINY + ["--no-compile", "--all-backends", "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    providers = {r["provider"] for r in result["rows"]}
    assert {"mmrnn_ext", "nn.RNN(concat)", "eager loop", "mmrnn_ext[reference]"} <= providers
    for shape in ([2, 3, 4, 5, 6], [1, 2, 3, 2, 5]):
        for p in providers:
            passes = {r["pass"] for r in result["rows"] if r["shape"] == shape and r["provider"] == p}
            assert passes == set(bench.PASSES), (shape, p)
    for r in result["rows"]:
        assert r["ms"] > 0 and r["relative_difference"] <= 1e-5 and r["saved_activations_mb"] >= 0
    assert {s["provider"] for s in result["skipped"]} >= {"torch.compile(loop)", "mmrnn_ext[triton]"}
    assert all(bool(r["path"]) == (r["provider"] == "nn.RNN(concat)") for r in result["rows"])  # which torch ran
    assert result["machine"]["cpu_cores"] and result["machine"]["torch"] == torch.__version__
    assert result["recurrence"] and result["recurrence"][0]["recurrence_gflops"] > 0
    assert png.stat().st_size > 10_000
    captured = capsys.readouterr()
    table = captured.out
    assert "nn.RNN(concat)" in table and "fwd+bwd ms" in table
    assert "\r" not in captured.err  # no progress bar when stderr is not a terminal
    md = bench.markdown_table(result)
    assert md.count("\n") == 1 + 2 * 2  # header, rule, one row per shape and pass


def test_compile_that_runs_out_of_time_is_skipped_not_hung(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(TINY[:2] + TINY[4:] + ["--compile-timeout", "0.05", "--no-recurrence", "--json", str(out)]) == 0
    skipped = {s["provider"]: s["reason"] for s in json.loads(out.read_text())["skipped"]}
    assert "longer than" in skipped["torch.compile(loop)"]


def test_disagreeing_provider_fails_loudly(monkeypatch, capsys):
    real = bench.eager_loop
    monkeypatch.setattr(bench.providers, "eager_loop", lambda x, image, model: real(x, image, model) * 1.01)
    assert bench.main(TINY + ["--no-compile"]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "eager loop disagrees" in err


@pytest.mark.parametrize("bad", [["--shape", "1,2,3"], ["--dtype", "float8"]])
def test_bad_arguments(bad):
    with pytest.raises(SystemExit):
        bench.main(bad)


def test_compiled_loop_provider_runs_and_agrees(tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--shape", "2,3,4,5,6", "--device", "cpu", "--repeats", "1", "--no-recurrence",
                       "--compile-timeout", "300", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["provider"] == "torch.compile(loop)"]
    assert {r["pass"] for r in rows} == set(bench.PASSES)
    assert all(r["relative_difference"] <= 1e-5 for r in rows)


def test_stock_path_names_the_implementation_torch_ran():
    """The bench says which implementation the stock provider ran (the issue asks, for bf16): here on
    CPU, oneDNN for the LSTM and torch's per-step loop for the GRU; a fused-cell loop is named as such."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4)
    lstm, gru = torch.nn.LSTM(4, 8), torch.nn.GRU(4, 8)
    assert bench.stock_path(lambda: lstm(x)[0]).startswith("oneDNN")
    assert bench.stock_path(lambda: gru(x)[0]) == "a per-step loop of aten ops (a GEMM per step)"
    h = torch.zeros(2, 8)
    cell = lambda: torch.ops.aten._thnn_fused_gru_cell(x[0] @ torch.ones(4, 24), h @ torch.ones(8, 24), h)  # noqa: E731
    if torch.cuda.is_available():  # the fused cell kernels are CUDA's
        assert "fused cell kernels" in bench.stock_path(cell)
    assert bench.stock_path(lambda: torch.ones(2) + 1).startswith("unrecognised")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_decode_section(tmp_path, cell, capsys):
    """--decode: µs per step of our cell and module (T = 1) and torch's, every provider present at
    both shapes, outputs checked against each other first."""
    out = tmp_path / "d.json"
    assert bench.main(["--decode", "--quick", "--cell", cell, "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cell"] == cell and result["machine"]["cpu_model"]
    providers = {"mmrnn_ext cell", f"nn.{cell.upper()}Cell(concat)", "mmrnn_ext module T=1",
                 f"nn.{cell.upper()}(concat) T=1"}
    for shape in bench.QUICK_DECODE_SHAPES:
        rows = [r for r in result["decode"] if (r["B"], r["I"], r["V"], r["H"]) == shape]
        assert {r["provider"] for r in rows} == providers
        assert all(r["us_per_step"] >= r["us_per_step_min"] > 0 for r in rows)
    assert "us/step" in capsys.readouterr().out


def test_decode_disagreement_fails_loudly(monkeypatch, capsys):
    real = bench.decode_providers

    def off(*args):
        providers = real(*args)
        name = "mmrnn_ext module T=1"
        f = providers[name]
        providers[name] = lambda: f() * 1.01
        return providers

    monkeypatch.setattr(bench.decode, "decode_providers", off)
    assert bench.main(["--decode", "--quick", "--repeats", "1"]) == 1
    assert "disagrees" in capsys.readouterr().err


def test_autocast_section(tmp_path):
    """--autocast bfloat16: every provider under CPU autocast, rows marked, within bf16's tolerance."""
    out = tmp_path / "a.json"
    assert bench.main(["--shape", "2,3,4,5,6", "--device", "cpu", "--repeats", "1", "--stock-only", "--cell", "lstm",
                       "--autocast", "bfloat16", "--no-recurrence", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows and all(r["autocast"] == "bfloat16" and r["relative_difference"] <= 1e-2 for r in rows)
    # torch's LSTM runs bf16 on oneDNN where the CPU has AVX-512; elsewhere it is skipped, with the reason
    stock = [r for r in rows if r["provider"] == "nn.LSTM(concat)"]
    reasons = [s["reason"] for s in result["skipped"] if s["provider"] == "nn.LSTM(concat)"]
    assert bool(stock) != bool(reasons) and all("cannot run here" in r for r in reasons)


@pytest.mark.parametrize("bad", [["--decode", "--shape", "1,2,3,4,5"], ["--autocast", "bfloat16", "--dtype", "float64"],
                                 ["--autocast", "float16"]])
def test_serving_modes_bad_arguments(bad):
    with pytest.raises(SystemExit):
        bench.main(bad + ["--device", "cpu"])


@pytest.mark.slow  # exports every cell to ONNX Runtime
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_onnx_runtime_providers(tmp_path, cell, capsys):
    """--onnx: both exported models timed in ONNX Runtime, inference only, checked against ours first."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "o.json"
    assert bench.main(["--shape", "2,3,4,5,6", "--device", "cpu", "--repeats", "1", "--stock-only", "--cell", cell,
                       "--onnx", "--no-recurrence", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ort_rows = [r for r in result["rows"] if r["provider"].startswith(bench.ONNX_RUNTIME)]
    assert {r["provider"] for r in ort_rows} == {bench.ONNX_RUNTIME + "mmrnn_ext",
                                                  bench.ONNX_RUNTIME + bench.stock_name(cell)}
    assert all(r["pass"] == "forward" and r["relative_difference"] <= 1e-5 for r in ort_rows)
    assert "inference only" in capsys.readouterr().out
    assert "inference only" in bench.markdown_table(result)


@pytest.mark.parametrize("bad", [["--onnx", "--autocast", "bfloat16"], ["--onnx", "--decode"]])
def test_onnx_bad_arguments(bad):
    with pytest.raises(SystemExit):
        bench.main(bad + ["--device", "cpu"])


def test_onnx_refused_before_any_work_when_onnxruntime_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))

    def no_work(*a, **k):
        raise AssertionError("mmrnn-bench started measuring before checking --onnx's needs")

    monkeypatch.setattr(bench.cli, "gemm_ceiling", no_work)
    monkeypatch.setattr(bench.cli, "run_case", no_work)
    with pytest.raises(SystemExit) as info:
        bench.main(TINY + ["--onnx", "--no-compile"])
    msg = str(info.value.code)
    assert "onnxruntime (--onnx)" in msg and 'mmrnn_ext[export]' in msg and "\n" not in msg


def _fake_turns(times_of):
    """cpu_turns returning the given seconds per round for every provider (times_of(name) -> list)."""
    return lambda fns, rounds: {name: list(times_of(name)) for name in fns}


def test_disagreeing_repeats_are_flagged_in_table_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.timing, "cpu_turns", _fake_turns(
        lambda name: [1e-3, 1e-3, 5e-3] if name.startswith("eager") else [2e-3, 2.1e-3, 2.05e-3]))
    out = tmp_path / "r.json"
    assert bench.main(TINY[:2] + TINY[4:] + ["--no-compile", "--no-recurrence", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    noisy = [r for r in result["rows"] if r["noisy"]]
    assert noisy and all(r["provider"] == "eager loop" for r in noisy)
    assert all(r["spread"] == pytest.approx(4.0) for r in noisy)
    assert result["unreliable"] == len(noisy) and result["noisy_spread_threshold"] == bench.NOISY_SPREAD
    table = capsys.readouterr().out
    assert "measurements are unreliable" in table and "worst 400%" in table
    eager_line = next(line for line in table.splitlines() if line.strip().startswith("eager loop"))
    assert "!" in eager_line


def test_impossible_rates_are_not_printed(tmp_path, monkeypatch, capsys):
    """A timing far below what the machine's ceiling allows (a clock glitch on a busy machine) gives
    no GF/s, no percentage: 'n/a' and the note."""
    monkeypatch.setattr(bench.timing, "cpu_turns", _fake_turns(lambda name: [1e-12] * 3))
    monkeypatch.setattr(bench.cli, "gemm_ceiling", lambda: {"gflops": 100.0, "by": "torch.mm", "rates": {}, "n": 2048})
    out = tmp_path / "r.json"
    assert bench.main(["--shape", "8,16,32,8,64", "--device", "cpu", "--repeats", "3", "--no-compile",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(r["impossible_rate"] and r["noisy"] for r in result["rows"] if r["gemm_gflops"] is not None)
    rec = result["recurrence"][0]
    assert rec["impossible_rate"] and rec["fraction_of_mm"] is None
    text = capsys.readouterr().out
    assert "n/a" in text and "no rate reported" in text
    assert not any(len(tok) > 6 and tok.endswith("%)") for tok in text.split())  # no '(1035832%)'


def test_pytest_benchmark_suite_runs_every_case(tmp_path):
    """bench/test_bench.py (`bash scripts/dev.sh bench`) on the quick grid, every case once without
    timing: its options come from mmrnn-bench's parser, so a new CLI option cannot break it unseen."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MMRNN_BENCH_QUICK="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(root, "bench"), "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    n = len(bench.QUICK_CPU_GRID) * 3 * len(bench.PASSES)
    assert f"{n} passed" in proc.stdout, proc.stdout[-2000:]


def test_train_step_mode_writes_checked_rows(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert bench.main(["--train-step", "--quick", "--device", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["train_step"]
    cells = {(r["cell"], r["pass_name"]) for r in rows if r["kind"] == "cell"}
    assert cells == {(c, p) for c in ("rnn", "lstm", "gru") for p in ("forward+backward", "forward (grad)")}
    assert any(r["kind"] == "decoder" for r in rows)
    assert {(r["cell"], r["pass_name"]) for r in rows if r["kind"] == "per-step image"} == {
        (c, p) for c in ("rnn", "lstm", "gru") for p in ("inference", "training")}
    for r in rows:
        assert r["mmrnn_ext_us"] > 0 and r["torch_us"] > 0 and r["x"] == pytest.approx(r["torch_us"] / r["mmrnn_ext_us"])
    assert result["machine"]["cpu_model"]
    assert "attention decoder" in capsys.readouterr().out


def test_train_step_refuses_other_modes():
    with pytest.raises(SystemExit, match="--train-step"):
        bench.main(["--train-step", "--decode"])


def test_migrate_mode_writes_checked_rows(tmp_path, capsys):
    """mmrnn-bench --migrate: both models, at their batch and at batch 1, converted with
    mmrnn_ext.convert (what it swapped recorded), outputs checked before timing."""
    out = tmp_path / "m.json"
    assert bench.main(["--migrate", "--quick", "--device", "cpu", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["migrate"]
    assert [(r["model"].split(":")[0], r["B"]) for r in rows] == [("speech encoder", 4), ("speech encoder", 1),
                                                                  ("text classifier", 4), ("text classifier", 1)]
    assert rows[0]["swapped"] == ["rnn: torch.nn.GRU -> mmrnn_ext.GRU"]
    assert rows[2]["swapped"] == ["rnn: torch.nn.LSTM -> mmrnn_ext.LSTM"]
    for r in rows:
        assert r["converted_ms"] > 0 and r["torch_ms"] > 0 and r["x"] == pytest.approx(r["torch_ms"] / r["converted_ms"])
    assert "text classifier" in capsys.readouterr().out


def test_migrate_refuses_other_modes():
    with pytest.raises(SystemExit, match="--migrate: .* got --decode"):
        bench.main(["--migrate", "--decode"])
