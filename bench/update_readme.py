"""Regenerate the measured sections of README.md and docs/ (results.md, training.md, deploying.md;
each section lives in one of them, between its markers) from the committed results:

    python bench/update_readme.py

The CPU performance sections (between <!-- cpu-table:start/end --> for the RNN, <!-- cpu-lstm-table:... -->
and <!-- cpu-gru-table:... --> for the gated cells) from bench/results/cpu.json, cpu_lstm.json and
cpu_gru.json: the machine, the table (mmrnn-bench --markdown), the GEMM rates, the recurrence-vs-torch.mm
figures and the plot. The serving table (between <!-- cpu-serving-table:start/end -->) from
bench/results/cpu_serving_{rnn,lstm,gru}_run*.json (mmrnn-bench --grid serving --stock-only), the
bf16 one (<!-- cpu-bf16-table -->) from cpu_serving_bf16_*_run*.json (the same with --autocast
bfloat16), the decoding one (<!-- cpu-decode-table -->) from cpu_decode_*_run*.json (mmrnn-bench
--decode), the ONNX Runtime one (<!-- onnx-table -->) from cpu_onnx_*_run*.json (mmrnn-bench --onnx) and
the cells-with-gradients one (<!-- cpu-train-step-table -->) from cpu_train_step_run*.json
(mmrnn-bench --train-step) and the migration one (<!-- cpu-migrate-table -->) from cpu_migrate_run*.json
(mmrnn-bench --migrate).
The training results (between <!-- train-table:start/end -->) from
bench/results/train_quick_ablate.json and its log (bash bench/train_ablation.sh), and the gap sweep
(between <!-- gap-table:start/end -->) from bench/results/gap_sweep_quick.json and its log
(bash bench/gap_sweep.sh).
The GPU section (between <!-- gpu-table:start/end -->) from bench/results/gpu_h100_*.json, the
files bench/gpu_check.sh wrote on a lent H100 (tables by bench/gpu_summary.py)."""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmrnn_ext.bench import markdown_table  # noqa: E402

START, END = "<!-- cpu-table:start -->", "<!-- cpu-table:end -->"
TRAIN_START, TRAIN_END = "<!-- train-table:start -->", "<!-- train-table:end -->"
GAP_START, GAP_END = "<!-- gap-table:start -->", "<!-- gap-table:end -->"
SEEDS_START, SEEDS_END = "<!-- seeds-table:start -->", "<!-- seeds-table:end -->"
GPU_START, GPU_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
GATED = {cell: (f"<!-- cpu-{cell}-table:start -->", f"<!-- cpu-{cell}-table:end -->") for cell in ("lstm", "gru")}
GPU_PREFIX = "gpu_h100_"
SERVING_START, SERVING_END = "<!-- cpu-serving-table:start -->", "<!-- cpu-serving-table:end -->"
BF16_START, BF16_END = "<!-- cpu-bf16-table:start -->", "<!-- cpu-bf16-table:end -->"
DECODE_START, DECODE_END = "<!-- cpu-decode-table:start -->", "<!-- cpu-decode-table:end -->"
MIGRATE_START, MIGRATE_END = "<!-- cpu-migrate-table:start -->", "<!-- cpu-migrate-table:end -->"
ONNX_START, ONNX_END = "<!-- onnx-table:start -->", "<!-- onnx-table:end -->"
STEP_START, STEP_END = "<!-- cpu-train-step-table:start -->", "<!-- cpu-train-step-table:end -->"

GPU_NOTES = """Where the time goes, per step of the recurrence (the kernels-alone table; FLOPs = 2·B·H²):

- **Small hidden sizes (hidden 128/256, persistent form) are latency-bound.** At (16,·,·,·,128) a step is
  0.5 MFLOP and 8 KB — nanoseconds of arithmetic and bandwidth — yet takes 1.1 µs (bf16): the chain
  dot → tanh → re-layout of h into the next dot's operand → next dot, inside one program. cuDNN's
  persistent small-hidden kernel runs the same step in about 0.8 µs (fp16, input GEMM included), hence
  the misses against cuDNN fp16 and fp32 at hidden 128/256; against PyTorch's bf16 (a per-step op loop)
  it is 6.6–17×. In forward+backward the rest of a training step (autograd, the projections' GEMMs and
  their launches) weighs on these short problems: at (16,256,·,·,128) bf16 the two recurrence kernels
  alone take 0.44 ms of the 1.15 ms step.
- **Large hidden sizes (cooperative form) are bound by L2 traffic and the grid barrier.** At
  (256,·,·,·,1024) bf16 each of 128 programs re-reads its 64 rows of h_{t-1} (128 KB) and its 32 columns
  of W_hh (64 KB) from L2 every step: 24.6 MB per step, which at the ~5 TB/s L2 bandwidth is the 5.0 µs
  measured; the arithmetic (0.54 GFLOP) would take 0.7 µs on the tensor cores and the HBM floor (read
  x_t, write h_t) is 0.35 µs. The barrier and the chain cost ~2 µs per step on their own (the smallest cooperative problem,
  (16,·,·,·,128) bf16, took 2.0 µs). That is the miss against PyTorch's bf16 at the largest shape: its
  per-step loop runs full-size cuBLAS GEMMs there. Keeping W_hh on chip across steps would cut a third of the traffic;
  Triton places a loaded W_hh in registers (it spills beyond 128 KB), so that needs a different kernel.
- **float32** moves twice the bytes of bf16 through the same chain; with TF32 allowed cuDNN's fp32 RNN
  is the strongest anchor at small hidden sizes (0.14 ms at (16,256,·,·,128)).

Run-to-run spread: three device runs timed the same bf16 kernels (bench/NOTES.md; the host path of
eager calls got lighter after the first). Cells bound by host work, or by the PyTorch baseline's own
per-step loop, moved: bf16 vs PyTorch bf16 at (64,256,512,1024,512) 4.5–6.3× forward and 4.4–6.0×
forward+backward (so neither 5× is robust), at (256,128,1024,2048,1024) 2.4–3.7×; bf16 vs cuDNN fp16 at
hidden 128/256 0.43–0.82×. bf16 vs cuDNN fp16 at hidden 512/1024 and at batch 1 (1.16–3.3×), bf16 vs
PyTorch bf16 at hidden 128/256 (5.5× and more) and the batch-1 step time (1.40–1.41 µs) held in every run."""


CELL_NOTES = {
    "rnn": "PyTorch's CPU RNN is a per-step loop of ATen ops; `mmrnn_ext` and `mmrnn_ext[cpp]` run the "
           "same code, so the gap between their rows shows the run's noise.",
    "lstm": "PyTorch runs its CPU LSTM through oneDNN (a fused kernel); `mmrnn_ext` and `mmrnn_ext[cpp]` "
            "run the same code, so the gap between their rows shows the run's noise.",
    "gru": "PyTorch's CPU GRU is a per-step loop of ATen ops; `mmrnn_ext` and `mmrnn_ext[cpp]` run the "
           "same code, so the gap between their rows shows the run's noise.",
}


def gflops_table(result: dict) -> list:
    """Each provider's forward+backward GEMM rate (its own algorithm's GEMM FLOPs / its time)."""
    rows = [r for r in result["rows"] if r["pass"] == "forward+backward" and r.get("gemm_gflops") is not None]
    if not rows:
        return []
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["The forward+backward's GEMM FLOPs (each provider's own: the concatenating one multiplies I + V "
             "input columns at every step) over its time, in GF/s:", "",
             "| shape (B,T,I,V,H) | GFLOP (mmrnn_ext) | " + " | ".join(providers) + " |",
             "|" + " --- |" * (2 + len(providers))]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        group = {r["provider"]: r for r in rows if tuple(r["shape"]) == shape}
        cells = [f"{group[p]['gemm_gflops']:.1f}" if p in group else "" for p in providers]
        lines.append(f"| {','.join(map(str, shape))} | {group['mmrnn_ext']['gemm_gflop']:.2f} | " + " | ".join(cells) + " |")
    return lines + [""]


def spread_table(results: list, json_rels: list) -> list:
    """Speedups of mmrnn_ext over each other provider across separate runs: mean and minimum."""
    if len(results) < 2:
        return []
    keys = [(tuple(r["shape"]), r["provider"], r["pass"]) for r in results[0]["rows"]
            if r["provider"] != "mmrnn_ext" and not r["provider"].startswith("mmrnn_ext[")]
    lines = [f"Across {len(results)} separate runs ({', '.join(f'`{j}`' for j in json_rels)}), x = that provider's "
             "time / mmrnn_ext's, mean (minimum):", "",
             "| shape (B,T,I,V,H) | provider | forward | forward+backward |", "| --- | --- | --- | --- |"]
    for shape, provider in dict.fromkeys((k[0], k[1]) for k in keys):
        cells = []
        for pass_name in ("forward", "forward+backward"):
            xs = [r["speedup_of_mmrnn_ext"] for res in results for r in res["rows"]
                  if (tuple(r["shape"]), r["provider"], r["pass"]) == (shape, provider, pass_name)]
            cells.append(f"{sum(xs) / len(xs):.2f}x ({min(xs):.2f}x)" if len(xs) == len(results) else "")
        lines.append(f"| {','.join(map(str, shape))} | {provider} | {cells[0]} | {cells[1]} |")
    return lines + [""]


def cpu_line(m: dict) -> str:
    """The CPU a results file was measured on: model, vendor, cores, the engine's vector path and
    the machine's big-GEMM ceiling (older files carry only the model)."""
    text = f"{m['device']}"
    if m.get("cpu_vendor"):
        text += f" ({m['cpu_vendor']}"
        text += f"; mmrnn_ext's engine path {m['engine_isa']})" if m.get("engine_isa") else ")"
    text += f", {m['cpu_cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, {m['date'][:10]}"
    ceiling = m.get("gemm_ceiling")
    if ceiling:
        text += f"; big-GEMM ceiling {ceiling['gflops']:.0f} GF/s ({ceiling['by']}, 2048³ float32)"
    return text


def serving_section(cells: dict, autocast: bool = False) -> str:
    """Every cell against torch's own module at the serving grid, across separate runs: inference
    (no_grad) and training speedups and our inference rate as a fraction of the ceiling, mean (min).
    autocast: the runs under torch.autocast("cpu", torch.bfloat16) (mmrnn-bench --autocast bfloat16)."""
    first = next(iter(next(iter(cells.values())).values()))
    how = ("float32 models and inputs under `torch.autocast(\"cpu\", torch.bfloat16)` (both sides), "
           if autocast else "float32, ")
    flag, name = (" --autocast bfloat16", "cpu_serving_bf16_CELL_runN") if autocast else ("", "cpu_serving_CELL_runN")
    lines = [f"Measured on {cpu_line(first['machine'])}; {how}one layer, unidirectional, V = 64; each figure the "
             f"median of 5 timed calls (providers taking turns, each timed call right after an untimed one of its own), "
             f"then mean (minimum) over {len(next(iter(cells.values())))} separate runs "
             f"(`mmrnn-bench --cell CELL --grid serving --stock-only{flag} --json bench/results/{name}.json`). "
             "x = torch's module on the concatenated input (its time) / mmrnn_ext's; % ceiling = mmrnn_ext's "
             "inference GEMM FLOPs (its own algorithm's: input product + recurrence) per second over the "
             "machine's big-GEMM rate (float32), measured at the start of each run.", "",
             "| cell | shape (B,T,I,V,H) | torch ran | inference x | training x | inference % ceiling |",
             "| --- | --- | --- | --- | --- | --- |"]
    for cell, runs in cells.items():
        results = list(runs.values())
        for shape in dict.fromkeys(tuple(r["shape"]) for r in results[0]["rows"]):
            def pick(res, provider, pass_name):
                return next(r for r in res["rows"] if tuple(r["shape"]) == shape and r["provider"] == provider
                            and r["pass"] == pass_name)

            stock = f"nn.{cell.upper()}(concat)"
            fwd = [pick(res, stock, "forward")["speedup_of_mmrnn_ext"] for res in results]
            train = [pick(res, stock, "forward+backward")["speedup_of_mmrnn_ext"] for res in results]
            ceil = [100 * pick(res, "mmrnn_ext", "forward")["fraction_of_ceiling"] for res in results]
            path = pick(results[0], stock, "forward").get("path") or ""
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            lines.append(f"| {cell} | {','.join(map(str, shape))} | {path.split(' (')[0]} | {mean(fwd):.2f}x ({min(fwd):.2f}x) | "
                         f"{mean(train):.2f}x ({min(train):.2f}x) | {mean(ceil):.0f}% ({min(ceil):.0f}%) |")
    files = ", ".join(f"`{os.path.relpath(p, ROOT)}`" for runs in cells.values() for p in runs)
    lines += ["", f"Sources: {files}."]
    return "\n".join(lines)


def decode_section(cells: dict) -> str:
    """Decoding: µs per step of our cell and module (T = 1, carried state) against torch's, mean
    (minimum over runs of each run's median) over separate runs of mmrnn-bench --decode."""
    first = next(iter(next(iter(cells.values())).values()))
    runs_n = len(next(iter(cells.values())))
    r0 = first["decode"][0]
    lines = [f"Measured on {cpu_line(first['machine'])}; float32, no_grad, V = 64; µs per step = a round of "
             f"{r0['steps_per_round']} steps from a zero state over {r0['steps_per_round']}, the median of "
             f"{r0['rounds']} rounds (providers taking turns), then mean (minimum) over {runs_n} separate runs "
             "(`mmrnn-bench --decode --cell CELL --json bench/results/cpu_decode_CELL_runN.json`). torch's side "
             "gets its input already concatenated with the image. x = torch's time / ours (above 1: ours is faster).",
             "", "| cell | B,I,V,H | our cell µs | torch's cell µs | cell x | our module, T=1, µs | torch's module, "
             "T=1, µs | module x |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for cell, runs in cells.items():
        results = list(runs.values())
        shapes = dict.fromkeys((r["B"], r["I"], r["V"], r["H"]) for r in results[0]["decode"])
        names = {"oc": "mmrnn_ext cell", "tc": f"nn.{cell.upper()}Cell(concat)", "om": "mmrnn_ext module T=1",
                 "tm": f"nn.{cell.upper()}(concat) T=1"}
        for shape in shapes:
            us = {k: [next(r["us_per_step"] for r in res["decode"] if (r["B"], r["I"], r["V"], r["H"]) == shape
                           and r["provider"] == n) for res in results] for k, n in names.items()}
            xc = [t / o for t, o in zip(us["tc"], us["oc"])]
            xm = [t / o for t, o in zip(us["tm"], us["om"])]
            lines.append(f"| {cell} | {','.join(map(str, shape))} | {mean(us['oc']):.1f} | {mean(us['tc']):.1f} | "
                         f"{mean(xc):.2f}x ({min(xc):.2f}x) | {mean(us['om']):.1f} | {mean(us['tm']):.1f} | "
                         f"{mean(xm):.2f}x ({min(xm):.2f}x) |")
    files = ", ".join(f"`{os.path.relpath(p, ROOT)}`" for runs in cells.values() for p in runs)
    lines += ["", f"Sources: {files}."]
    return "\n".join(lines)


def _load_all(paths: list) -> list:
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    return results


def train_step_section(paths: list) -> str:
    """The cells with gradients, the modules with a per-step image and the attention decoder
    (mmrnn-bench --train-step): each row's medians averaged over runs, x mean (minimum) over runs."""
    results = _load_all(paths)
    first = results[0]
    lines = [f"Measured on {cpu_line(first['machine'])}; float32; per row the median over "
             f"{first['train_step'][0]['rounds']} rounds (providers taking turns), then mean over {len(results)} "
             "separate runs, x mean (minimum) over the runs (`mmrnn-bench --train-step --json "
             "bench/results/cpu_train_step_runN.json`). torch's side gets the input already concatenated with the "
             "image (context). x = torch's time / ours (above 1: ours is faster).", "",
             "| what | shape | pass | mmrnn_ext µs | torch µs | x |", "| --- | --- | --- | --- | --- | --- |"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    key = lambda r: (r["kind"], r["cell"], r.get("B"), r.get("T"), r.get("I"), r.get("V"), r.get("H"), r["pass_name"])  # noqa: E731
    for row in first["train_step"]:
        same = [next(r for r in res["train_step"] if key(r) == key(row)) for res in results]
        xs = [r["x"] for r in same]
        if row["kind"] == "cell":
            what, shape = f"{row['cell'].upper()}Cell", "B,I,V,H = " + ",".join(str(row[k]) for k in "BIVH")
        elif row["kind"] == "per-step image":
            what, shape = f"{row['cell'].upper()} module, per-step image", "B,T,I,V,H = " + ",".join(
                str(row[k]) for k in "BTIVH")
        else:
            what, shape = "attention decoder (LSTMCell)", (f"B={row['B']}, {row['steps']} steps, {row['regions']}×"
                                                           f"{row['features']} context, E={row['embed']}, H={row['hidden']}")
        lines.append(f"| {what} | {shape} | {row['pass_name']} | {mean([r['mmrnn_ext_us'] for r in same]):.0f} | "
                     f"{mean([r['torch_us'] for r in same]):.0f} | {mean(xs):.2f}x ({min(xs):.2f}x) |")
    lines += ["", "Sources: " + ", ".join(f"`{os.path.relpath(p, ROOT)}`" for p in paths) + "."]
    return "\n".join(lines)


def migrate_section(paths: list) -> str:
    """torch models served before and after mmrnn_ext.convert (mmrnn-bench --migrate): each row's
    medians averaged over runs, x mean (minimum) over runs."""
    results = _load_all(paths)
    first = results[0]
    lines = [f"Measured on {cpu_line(first['machine'])}; float32, `torch.no_grad()`; per row the median over "
             f"{first['migrate'][0]['rounds']} rounds (the two models taking turns), then mean over {len(results)} "
             "separate runs, x mean (minimum) over the runs (`mmrnn-bench --migrate --json "
             "bench/results/cpu_migrate_runN.json`). The same weights before and after; x = torch's time / the "
             "converted model's (above 1: converted is faster).", "",
             "| model | what convert swapped | B, T | converted ms | torch ms | x |", "| --- | --- | --- | --- | --- | --- |"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for row in first["migrate"]:
        same = [next(r for r in res["migrate"] if (r["model"], r["B"]) == (row["model"], row["B"])) for res in results]
        xs = [r["x"] for r in same]
        args = ", ".join(f"{k.removeprefix('arg_')}={v}" for k, v in row.items() if k.startswith("arg_"))
        lines.append(f"| {row['model']} ({args}) | {'; '.join(row['swapped'])} | {row['B']}, {row['T']} | "
                     f"{mean([r['converted_ms'] for r in same]):.2f} | {mean([r['torch_ms'] for r in same]):.2f} | "
                     f"{mean(xs):.2f}x ({min(xs):.2f}x) |")
    lines += ["", "Sources: " + ", ".join(f"`{os.path.relpath(p, ROOT)}`" for p in paths) + "."]
    return "\n".join(lines)


def onnx_section(cells: dict) -> str:
    """Serving in ONNX Runtime: inference ms of mmrnn_ext and nn.X(concat), eager and exported
    (mmrnn-bench --onnx), mean (minimum) over separate runs."""
    first = next(iter(next(iter(cells.values())).values()))
    runs_n = len(next(iter(cells.values())))
    lines = [f"Measured on {cpu_line(first['machine'])}; float32, inference (no_grad), one layer, unidirectional, "
             f"V = 64; each figure the median of 5 timed calls (providers taking turns), then mean (minimum) over "
             f"{runs_n} separate runs (`mmrnn-bench --cell CELL --grid serving --stock-only --onnx --json "
             "bench/results/cpu_onnx_CELL_runN.json`). ONNX Runtime: the model exported with `torch.onnx.export(..., "
             "dynamo=True)` and run on CPUExecutionProvider with as many threads as torch; every output checked "
             "against mmrnn_ext's eager one before timing. x = that time / mmrnn_ext eager's.", "",
             "| cell | shape (B,T,I,V,H) | mmrnn_ext eager ms | nn.X(concat) eager ms | ONNX Runtime: mmrnn_ext ms (x) "
             "| ONNX Runtime: nn.X(concat) ms (x) |", "| --- | --- | --- | --- | --- | --- |"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for cell, runs in cells.items():
        results = list(runs.values())
        stock = f"nn.{cell.upper()}(concat)"
        names = ["mmrnn_ext", stock, "ONNX Runtime: mmrnn_ext", f"ONNX Runtime: {stock}"]
        for shape in dict.fromkeys(tuple(r["shape"]) for r in results[0]["rows"]):
            ms = {n: [next((r["ms"] for r in res["rows"] if tuple(r["shape"]) == shape and r["provider"] == n
                            and r["pass"] == "forward"), None) for res in results] for n in names}
            cells_ = []
            for n in names:
                if None in ms[n]:
                    cells_.append("skipped")
                    continue
                text = f"{mean(ms[n]):.2f} ({min(ms[n]):.2f})"
                if n.startswith("ONNX"):
                    x = [a / b for a, b in zip(ms[n], ms["mmrnn_ext"])]
                    text += f", {mean(x):.2f}x"
                cells_.append(text)
            lines.append(f"| {cell} | {','.join(map(str, shape))} | " + " | ".join(cells_) + " |")
    files = ", ".join(f"`{os.path.relpath(p, ROOT)}`" for runs in cells.values() for p in runs)
    lines += ["", f"Sources: {files}."]
    return "\n".join(lines)


def _runs(pattern: str) -> dict:
    """{cell: {path: result}} for bench/results/<pattern with {cell}>, cells with no file left out."""
    found = {}
    for cell in ("rnn", "lstm", "gru"):
        paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", pattern.format(cell=cell))))
        if paths:
            found[cell] = {}
            for path in paths:
                with open(path) as f:
                    found[cell][path] = json.load(f)
    return found


def section(result: dict, json_rel: str, png_rel: str) -> str:
    m = result["machine"]
    cell = result.get("cell", "rnn")
    G = {"rnn": "", "lstm": "4", "gru": "3"}[cell]
    flag = "" if cell == "rnn" else f"--cell {cell} "
    lines = [f"Measured on {cpu_line(m)}; float32, one layer, unidirectional; median of "
             f"5 timed calls, providers taking turns, each timed call right after an untimed one of its own. "
             f"Source: `{json_rel}` (regenerate: `mmrnn-bench {flag}--all-backends "
             f"--json {json_rel} --plot {png_rel}`, then `python bench/update_readme.py`).", "",
             markdown_table(result), "",
             "x = that provider's time / mmrnn_ext's; saved MB = what autograd keeps for backward during "
             f"the forward (parameters excluded): nn.{cell.upper()}(concat) keeps the input widened by the "
             "image at every step. " + CELL_NOTES[cell], ""]
    runs = sorted(glob.glob(os.path.join(ROOT, os.path.splitext(json_rel)[0] + "_run*.json")))
    extra = []
    for path in runs:
        with open(path) as f:
            extra.append(json.load(f))
    lines += spread_table([result] + extra, [json_rel] + [os.path.relpath(p, ROOT) for p in runs])
    lines += gflops_table(result)
    if result.get("recurrence"):
        lines.append(f"The recurrence alone (forward) against T calls of torch.mm on the same [B,H]×[H,{G}H] GEMM:")
        lines.append("")
        lines.append("| shape (B,T,I,V,H) | backend | recurrence GF/s | torch.mm GF/s | fraction |")
        lines.append("| --- | --- | --- | --- | --- |")
        for r in result["recurrence"]:
            lines.append(f"| {','.join(map(str, r['shape']))} | {r['backend']} | {r['recurrence_gflops']:.1f} | "
                         f"{r['mm_gflops']:.1f} | " + ("n/a (timing disturbed)" if r.get("fraction_of_mm") is None
                                                           else f"{100 * r['fraction_of_mm']:.0f}%") + " |")
        lines.append("")
    lines.append(f"![CPU speedups]({png_rel})")
    return "\n".join(lines)


def train_section(result: dict, json_rel: str, machine: str) -> str:
    seeds = sorted(next(iter(result.values())).get("seeds", {}), key=int)
    lines = [f"Measured with `bash bench/train_ablation.sh` (`mmrnn-train --quick --ablate --cell rnn --seeds {','.join(seeds)} "
             f"--explain 3 --json {json_rel}`) on {machine}: the built-in task's test split, each variant trained "
             f"once per seed (seed = split and initialisation), mean and minimum over the {len(seeds)} seeds "
             "(targets: `add` >= 0.95, text-only and image-only <= 0.65):", "",
             "| variant | test accuracy, mean (min) | macro-F1, mean (min) | epochs (mean) | seconds (mean) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in result.items():
        lines.append(f"| {name} | {r['test_accuracy']:.4f} ({r['test_accuracy_min']:.4f}) | {r['macro_f1']:.4f} "
                     f"({r['macro_f1_min']:.4f}) | {r['epochs']:.1f} | {r['seconds']:.1f} |")
    stem = os.path.splitext(json_rel)[0]
    others = {}
    for cell in ("lstm", "gru"):
        path = os.path.join(ROOT, f"{stem}_{cell}.json")
        if os.path.exists(path):
            with open(path) as f:
                others[cell] = json.load(f)
    if others:
        lines += ["", f"The same ablation with `--cell {'|'.join(others)}` (same seeds and budget; "
                  + ", ".join(f"`{stem}_{c}.json`" for c in others) + "): test accuracy, mean (min):", "",
                  "| variant | rnn | " + " | ".join(others) + " |", "| --- | --- |" + " --- |" * len(others)]
        for name, r in result.items():
            lines.append(f"| {name} | {r['test_accuracy']:.4f} ({r['test_accuracy_min']:.4f}) | " + " | ".join(
                f"{o[name]['test_accuracy']:.4f} ({o[name]['test_accuracy_min']:.4f})" for o in others.values()) + " |")
    return "\n".join(lines)


def seeds_section(now: dict, before: dict, machine: str) -> str:
    """Every cell x fusion over seeds: accuracy now (the ablation JSONs) beside before the fixes (the
    diagnosis JSON's "before" runs) and with the first two fixes alone (its full ablation with the
    plateau rule and orthogonal W_hh, no pixel noise): same seeds, budget and machine; with the
    epochs and seconds each run took."""
    runs = before["variants"]["before"]["runs"]
    middle = before["variants"]["plateau_rule_orthogonal_whh_no_warmup"]["runs"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    seeds = sorted(next(iter(next(iter(now.values())).values()))["seeds"], key=int)
    lines = [f"Measured on {machine}, `mmrnn-train --quick` at gap 0, seeds {seeds[0]}-{seeds[-1]} (one run per cell, "
             "fusion and seed; `bash bench/train_ablation.sh`, `bench/results/train_quick_ablate{,_lstm,_gru}.json`). "
             "Before: the same runs with the code before the fixes; fixes 1-2: with the plateau rule and orthogonal "
             "W_hh but no pixel noise (`bench/results/train_seeds_diagnosis.json`, \"before\" and "
             "\"plateau_rule_orthogonal_whh_no_warmup\"). Epochs are the cost unit the fixes change (an epoch's cost "
             "is unchanged); seconds are each run's wall time for training and evaluation; the last column is the "
             "longest run now over the mean before (the target: at most 2).", "",
             "| cell | fusion | before: accuracy mean (min), runs < 0.95 | before: epochs mean | fixes 1-2: accuracy "
             "mean (min), runs < 0.95 | now: accuracy mean (min) | now: runs < 0.95 | now: epochs mean (max) "
             "| now: seconds mean (max) | longest now / mean before (epochs) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def summary(accs):
        return f"{mean(accs):.4f} ({min(accs):.4f}), {sum(a < 0.95 for a in accs)} of {len(accs)}"

    for cell, result in now.items():
        for fusion, r in result.items():
            per = list(r["seeds"].values())
            acc = [x["test_accuracy"] for x in per]
            ep = [x["epochs"] for x in per]
            sec = [x["seconds"] for x in per]
            old = [x for x in runs if x["cell"] == cell and x["fusion"] == fusion]
            mid = [x["acc"] for x in middle if x["cell"] == cell and x["fusion"] == fusion]
            b1 = summary([x["acc"] for x in old]) if old else "-"
            b2 = f"{mean([x['epochs'] for x in old]):.1f}" if old else "-"
            ratio = f"{max(ep) / mean([x['epochs'] for x in old]):.2f}" if old else "-"
            fails = sum(a < 0.95 for a in acc) if fusion in ("add", "concat", "init") else "-"
            lines.append(f"| {cell} | {fusion} | {b1} | {b2} | {summary(mid) if mid else '-'} | "
                         f"{mean(acc):.4f} ({min(acc):.4f}) | {fails} | {mean(ep):.1f} ({max(ep)}) | "
                         f"{mean(sec):.1f} ({max(sec):.1f}) | {ratio} |")
    return "\n".join(lines)


def gap_section(result: dict, json_rel: str, log_rel: str) -> str:
    with open(os.path.join(ROOT, log_rel)) as f:
        log = f.read().splitlines()
    machine = log[0].removeprefix("machine: ").strip()
    wall = next((int(line.split(":")[1]) for line in log if line.startswith("wall seconds:")), None)
    gaps = sorted(next(iter(result.values())), key=int)
    lines = [f"Measured with `bash bench/gap_sweep.sh` (`mmrnn-train --quick --sweep-gaps {','.join(gaps)} --cells "
             f"rnn,lstm,gru --ablate --json {json_rel} --plot {os.path.splitext(json_rel)[0]}.png`; log: `{log_rel}`) "
             f"on {machine}, seed 0, fusion `add` for the cells, the baselines on the tanh RNN"
             + (f"; the whole sweep took {wall / 60:.1f} min" if wall else "") + ". Test accuracy (targets: gap 0 "
             ">= 0.95 for every cell, gap 100 >= 0.90 for LSTM and GRU, baselines <= 0.65; chance 0.50):", "",
             "| | " + " | ".join(f"gap {g}" for g in gaps) + " |", "| --- |" + " --- |" * len(gaps)]
    for key, per_gap in result.items():
        lines.append(f"| {key} | " + " | ".join(f"{per_gap[g]['test_accuracy']:.4f}" for g in gaps) + " |")
    lines += ["", "Gap reached by the curriculum / epochs / seconds per run:", "",
              "| | " + " | ".join(f"gap {g}" for g in gaps) + " |", "| --- |" + " --- |" * len(gaps)]
    for key, per_gap in result.items():
        lines.append(f"| {key} | " + " | ".join(
            f"{per_gap[g]['curriculum_reached']} / {per_gap[g]['epochs']} / {per_gap[g]['seconds']:.0f}" for g in gaps) + " |")
    lines += ["", f"![test accuracy against gap]({os.path.splitext(json_rel)[0]}.png)"]
    stem = os.path.splitext(json_rel)[0]
    for suffix in ("_seeds", "_gap100_seeds"):  # the tanh RNN at every gap; the gated cells at gap 100
        seeds_path = os.path.join(ROOT, stem + suffix + ".json")
        if not os.path.exists(seeds_path):
            continue
        with open(seeds_path) as f:
            seeded = json.load(f)
        names = sorted(next(iter(next(iter(seeded.values())).values()))["seeds"], key=int)
        gaps_s = sorted(next(iter(seeded.values())), key=int)
        plot_link = f", [plot]({stem}{suffix}.png)" if os.path.exists(os.path.join(ROOT, stem + suffix + ".png")) else ""
        lines += ["", f"Across seeds ({', '.join(names)}; `{stem}{suffix}.json`{plot_link}): test accuracy, mean "
                  "(minimum); epochs and seconds per run, mean (maximum):", "",
                  "| | " + " | ".join(f"gap {g}" for g in gaps_s) + " | epochs | seconds |",
                  "| --- |" + " --- |" * (len(gaps_s) + 2)]
        for key, per_gap in seeded.items():
            runs = [r for g in gaps_s for r in per_gap[g]["seeds"].values()]
            ep, sec = [r["epochs"] for r in runs], [r["seconds"] for r in runs]
            lines.append(f"| {key} | " + " | ".join(
                f"{per_gap[g]['test_accuracy']:.4f} ({per_gap[g]['test_accuracy_min']:.4f})" for g in gaps_s)
                + f" | {sum(ep) / len(ep):.1f} ({max(ep)}) | {sum(sec) / len(sec):.0f} ({max(sec):.0f}) |")
    plain_path = os.path.join(ROOT, stem + "_nocurriculum.json")
    if os.path.exists(plain_path):
        with open(plain_path) as f:
            plain = json.load(f)
        gaps_p = sorted(next(iter(plain.values())), key=int)
        lines += ["", f"Without the curriculum (`--no-curriculum`: the target gap from the first epoch; "
                  f"`{stem}_nocurriculum.json`, seed 0): test accuracy / epochs:", "",
                  "| | " + " | ".join(f"gap {g}" for g in gaps_p) + " |", "| --- |" + " --- |" * len(gaps_p)]
        for key, per_gap in plain.items():
            lines.append(f"| {key} | " + " | ".join(
                f"{per_gap[g]['test_accuracy']:.4f} / {per_gap[g]['epochs']}" for g in gaps_p) + " |")
    return "\n".join(lines)


def gpu_section() -> str | None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(ROOT, "bench", "gpu_summary.py"))
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    data = summary.load(os.path.join(ROOT, "bench", "results"), GPU_PREFIX)
    if data["default"] is None:
        return None
    files = ", ".join(f"`bench/results/{GPU_PREFIX}{n}`" for n in ("bench_default.json", "bench_tf32_off.json",
                                                                     "sweep.json", "check.log"))
    lines = [f"Measured on {summary.header(data)}. Sources: {files} — written by `bash bench/gpu_check.sh` "
             "(GPU tests, kernel sweep, both benchmark runs, in one call), tables by "
             f"`python bench/gpu_summary.py bench/results {GPU_PREFIX}`. \"cuDNN\" = nn.RNN on the input "
             "concatenated with the image (cuDNN's RNN; in bf16, which cuDNN does not take, PyTorch's per-step "
             "fallback). Milliseconds:", "",
             summary.side_by_side(data), "", "The issue's targets (x = their time / ours):", "",
             summary.targets(data), "", "The kernels alone (`bench/gpu_sweep.py`: the size rule's choice, each "
             "checked against float64 at the benchmark shape before timing; floor: one forward step's recurrent-dot "
             "FLOPs at 798 TFLOP/s in 16-bit, half that with TF32, a sixth without, and its bytes at 3.0 TB/s, the "
             "H100 figures of GPU_NOTES — the rows sit 4-10x above it at (256,128,1024) and hundreds to thousands of "
             "times above it at the small shapes: there the chain of dependent steps (each a few dependent dots and "
             "a barrier or a register round trip) is the limit, not FLOPs or bytes):", "",
             summary.kernels_alone(data), "",
             GPU_NOTES, "", f"![GPU speedups](bench/results/{GPU_PREFIX}bench.png)"]
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, body: str) -> str:
    """The text with the section between start and end replaced by body (unchanged where the
    markers are not in this file: each section lives in README.md or in docs/results.md)."""
    if start not in text:
        return text
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return head + start + "\n" + _LINKS(body) + "\n" + end + tail


# Paths in generated bodies are relative to the repository root; docs/results.md rewrites its links.
_LINKS = lambda body: body  # noqa: E731
FILES = {"README.md": lambda body: body,
         **{os.path.join("docs", name): lambda body: body.replace("](bench/", "](../bench/")
            for name in ("results.md", "training.md", "deploying.md")}}


def main():
    global _LINKS
    for rel_path, links in FILES.items():
        path = os.path.join(ROOT, rel_path)
        with open(path) as f:
            text = f.read()
        _LINKS = links
        text = regenerate(text)
        with open(path, "w") as f:
            f.write(text)


def regenerate(text: str) -> str:
    """Every generated section the text holds, from the committed results."""
    for name, (start, end) in {"cpu": (START, END), "cpu_lstm": GATED["lstm"], "cpu_gru": GATED["gru"]}.items():
        json_path = os.path.join(ROOT, "bench", "results", f"{name}.json")
        if not os.path.exists(json_path):
            continue
        with open(json_path) as f:
            cell_result = json.load(f)
        rel = os.path.relpath(json_path, ROOT)
        text = _replace(text, start, end, section(cell_result, rel, os.path.splitext(rel)[0] + ".png"))
    serving = _runs("cpu_serving_{cell}_run*.json")
    if serving:
        text = _replace(text, SERVING_START, SERVING_END, serving_section(serving))
    bf16 = _runs("cpu_serving_bf16_{cell}_run*.json")
    if bf16:
        text = _replace(text, BF16_START, BF16_END, serving_section(bf16, autocast=True))
    decode = _runs("cpu_decode_{cell}_run*.json")
    if decode:
        text = _replace(text, DECODE_START, DECODE_END, decode_section(decode))
    onnx_runs = _runs("cpu_onnx_{cell}_run*.json")
    if onnx_runs:
        text = _replace(text, ONNX_START, ONNX_END, onnx_section(onnx_runs))
    step_paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "cpu_train_step_run*.json")))
    if step_paths and STEP_START in text:
        text = _replace(text, STEP_START, STEP_END, train_step_section(step_paths))
    migrate_paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "cpu_migrate_run*.json")))
    if migrate_paths and MIGRATE_START in text:
        text = _replace(text, MIGRATE_START, MIGRATE_END, migrate_section(migrate_paths))
    train_path = os.path.join(ROOT, "bench", "results", "train_quick_ablate.json")
    if os.path.exists(train_path):
        with open(train_path) as f:
            trained = json.load(f)
        with open(os.path.splitext(train_path)[0] + ".txt") as f:
            machine = f.readline().removeprefix("machine: ").strip()  # bench/train_ablation.sh writes it first
        text = _replace(text, TRAIN_START, TRAIN_END, train_section(trained, os.path.relpath(train_path, ROOT), machine))
        now = {"rnn": trained}
        for cell in ("lstm", "gru"):
            path = os.path.join(ROOT, "bench", "results", f"train_quick_ablate_{cell}.json")
            if os.path.exists(path):
                with open(path) as f:
                    now[cell] = json.load(f)
        diagnosis = os.path.join(ROOT, "bench", "results", "train_seeds_diagnosis.json")
        if os.path.exists(diagnosis) and SEEDS_START in text:
            with open(diagnosis) as f:
                text = _replace(text, SEEDS_START, SEEDS_END, seeds_section(now, json.load(f), machine))
    gap_path = os.path.join(ROOT, "bench", "results", "gap_sweep_quick.json")
    if os.path.exists(gap_path):
        with open(gap_path) as f:
            swept = json.load(f)
        rel = os.path.relpath(gap_path, ROOT)
        text = _replace(text, GAP_START, GAP_END, gap_section(swept, rel, os.path.splitext(rel)[0] + ".txt"))
    gpu = gpu_section()
    if gpu:
        text = _replace(text, GPU_START, GPU_END, gpu)
    return text


if __name__ == "__main__":
    main()
