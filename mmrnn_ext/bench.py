"""mmrnn-bench: mmrnn_ext against what users run today, side by side in one process.

    mmrnn-bench                       the default grid for this machine's device (the RNN)
    mmrnn-bench --cell lstm           the same for the LSTM (--cell gru: the GRU)
    mmrnn-bench --quick               a small grid (under a minute on a 2-core CPU)
    mmrnn-bench --grid serving --stock-only   the five serving shapes, mmrnn_ext against torch's module only
    mmrnn-bench --shape 32,128,128,128,256 --dtype float32 --json out.json --plot out.png

Providers, all with the same weights on the same inputs (X = RNN, LSTM or GRU, per --cell):
    mmrnn_ext            mmrnn_ext.X(image_size=V), backend "auto" (each backend with --all-backends)
    nn.X(concat)         torch.nn.X on the input concatenated with the image (cuDNN on GPU; oneDNN
                         for the LSTM on CPU; in bfloat16 whichever path the installed torch takes:
                         the table and JSON ("path") name it, read from the aten ops one call ran)
    eager loop           a Python loop of torch ops, input and image projections precomputed
    torch.compile(loop)  that loop compiled (skipped, with the reason, when it would take too long)
    ONNX Runtime: ...    with --onnx: mmrnn_ext.X and nn.X(concat) exported (torch.onnx.export,
                         dynamo) and run in ONNX Runtime on CPU; inference only

Two passes per provider: "inference" (the forward under torch.no_grad, what a served model runs;
"forward" in the JSON) and "forward+backward" (a training step). On CPU the machine's own ceiling is
measured first (the better of torch.mm and oneDNN's linear on a 2048^3 float32 GEMM) and every GF/s
figure is also given as a fraction of it; the CPU's model, vendor and the vector path mmrnn_ext takes
are named in the output and the JSON.

Before timing, every provider's output is compared with mmrnn_ext's; a disagreement beyond the
dtype's tolerance stops the run with an error rather than report a speed. With --layers > 1 the
image enters layer 0 only (the other layers' W_img are zero), so that nn.X on the concatenated
input computes the same function.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import mmrnn_ext
from mmrnn_ext import _backends, _cli

CPU_GRID = [(32, 128, 128, 128, 64), (32, 128, 128, 128, 256), (64, 256, 256, 512, 512), (8, 512, 128, 256, 1024)]
GPU_GRID = [(16, 256, 128, 256, 128), (64, 256, 256, 512, 256), (64, 256, 512, 1024, 512),
            (256, 128, 1024, 2048, 1024), (1, 1024, 64, 64, 256)]
# what served recurrent models see on CPUs: batch 1 to 64, hidden 256 to 1024 (one not a power of two)
SERVING_GRID = [(32, 128, 128, 64, 256), (64, 256, 256, 64, 512), (8, 512, 128, 64, 1024), (1, 512, 128, 64, 256),
                (24, 100, 96, 64, 320)]
QUICK_CPU_GRID = [(8, 32, 32, 32, 64), (16, 64, 64, 64, 128)]
# decoding: one cell call per generated token, (B, I, V, H); a round runs DECODE_STEPS steps
DECODE_SHAPES = [(1, 128, 64, 256), (16, 256, 64, 512)]
QUICK_DECODE_SHAPES = [(1, 16, 8, 32), (4, 32, 8, 64)]
DECODE_STEPS = 64
QUICK_GPU_GRID = [(16, 64, 128, 256, 128), (1, 128, 64, 64, 256)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
PASSES = ("forward", "forward+backward")
OURS = "mmrnn_ext"
CELLS = {"rnn": (mmrnn_ext.RNN, torch.nn.RNN, 1), "lstm": (mmrnn_ext.LSTM, torch.nn.LSTM, 4),
         "gru": (mmrnn_ext.GRU, torch.nn.GRU, 3)}
CELL_MODULES = {"rnn": (mmrnn_ext.RNNCell, torch.nn.RNNCell), "lstm": (mmrnn_ext.LSTMCell, torch.nn.LSTMCell),
                "gru": (mmrnn_ext.GRUCell, torch.nn.GRUCell)}


def stock_name(cell: str) -> str:
    return f"nn.{cell.upper()}(concat)"


class DisagreementError(RuntimeError):
    pass


# --- the providers --------------------------------------------------------------------------------

@dataclass
class Case:
    B: int
    T: int
    I: int
    V: int
    H: int
    dtype: torch.dtype
    device: torch.device
    layers: int = 1
    bidirectional: bool = False
    cell: str = "rnn"
    x: torch.Tensor = field(init=False)
    image: torch.Tensor = field(init=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.T, self.B, self.I, generator=g).to(self.device, self.dtype)
        self.image = torch.randn(self.B, self.V, generator=g).to(self.device, self.dtype)

    @property
    def shape(self):
        return (self.B, self.T, self.I, self.V, self.H)


def build_ours(case: Case, backend: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    model = CELLS[case.cell][0](case.I, case.H, case.layers, bidirectional=case.bidirectional, image_size=case.V,
                                backend=backend, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("weight_img") and not name.startswith("weight_img_l0"):
                p.zero_()  # image at layer 0 only: the function nn.RNN on the concatenation computes
    return model


def build_stock(case: Case, ours: torch.nn.Module) -> torch.nn.Module:
    stock = CELLS[case.cell][1](case.I + case.V, case.H, case.layers, bidirectional=case.bidirectional,
                                device=case.device, dtype=case.dtype)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            src = getattr(ours, name)
            if name.startswith("weight_ih_l0"):
                p.copy_(torch.cat([src, getattr(ours, name.replace("weight_ih", "weight_img"))], dim=1))
            else:
                p.copy_(src)
    return stock


def _eager_step(mode, a, gh, h, c, b_hn):
    """One step of the hand-written loop: a = input + image term (+ biases), gh = h @ W_hh^T."""
    if mode == "lstm":
        i, f, g, o = (a + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "gru":
        xr, xz, xn = a.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * (hn + b_hn))
        return n + z * (h - n), c
    return torch.tanh(a + gh), c


def eager_loop(x, image, model):
    """What users write by hand: one GEMM for the input projection, the image projection
    precomputed once, then a Python loop over time of torch ops (tanh RNN, LSTM or GRU)."""
    mode = {mmrnn_ext.LSTM: "lstm", mmrnn_ext.GRU: "gru"}.get(type(model), "rnn")
    D = 2 if model.bidirectional else 1
    T, H = x.shape[0], model.hidden_size
    layer_in = x
    for layer in range(model.num_layers):
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_img = model._layer_params(layer, d)
            b_hn = None
            if mode == "gru":  # b_hn stays inside the reset product
                b_hn, b_hh = b_hh[2 * H:], torch.cat([b_hh[:2 * H], b_hh.new_zeros(H)])
            xp = F.linear(layer_in, w_ih, b_ih + b_hh)
            img = F.linear(image, w_img)
            h = x.new_zeros(x.shape[1], H)
            c = h
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d == 1 else range(T)):
                h, c = _eager_step(mode, xp[t] + img, h @ w_hh.t(), h, c, b_hn)
                ys[t] = h
            outs.append(torch.stack(ys))
        layer_in = outs[0] if D == 1 else torch.cat(outs, dim=2)
    return layer_in


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the main thread once `seconds` have passed, and again every half second
    until the block ends: torch.compile's internals swallow some exceptions, so one alarm is not
    enough to stop it. The block's result must also be discarded when the yielded state says expired
    (the compile may have finished in a fallback after swallowing the first alarm)."""
    state = {"expired": False}
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield state
        return

    def on_alarm(signum, frame):
        state["expired"] = True
        raise TimeoutError(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _under_autocast(fn, dtype):
    def run():
        with torch.autocast("cpu", dtype=dtype):
            return fn()
    return run


def make_providers(case: Case, args) -> tuple[dict, dict]:
    """-> ({name: callable returning the output [T, B, D*H]}, {name: reason skipped}). With
    --autocast every provider runs under torch.autocast (float32 models and inputs)."""
    providers, skipped = _make_providers(case, args)
    if getattr(args, "autocast", None):
        dtype = DTYPES[args.autocast]
        providers = {name: _under_autocast(fn, dtype) for name, fn in providers.items()}
    return providers, skipped


def _make_providers(case: Case, args) -> tuple[dict, dict]:
    ours = build_ours(case)
    providers = {OURS: lambda: ours(case.x, image=case.image)[0]}
    skipped = {}
    if args.all_backends:
        for name, status in mmrnn_ext.backends().items():
            if not status["available"]:
                skipped[f"{OURS}[{name}]"] = status["detail"]
                continue
            try:
                _backends.select(name, case.device, case.dtype, case.cell)
            except (RuntimeError, TypeError) as exc:
                skipped[f"{OURS}[{name}]"] = str(exc)
                continue
            if name == "triton" and case.device.type == "cpu":
                skipped[f"{OURS}[{name}]"] = "the Triton interpreter is for testing, not timing"
                continue
            model = build_ours(case, name)
            providers[f"{OURS}[{name}]"] = (lambda m: lambda: m(case.x, image=case.image)[0])(model)
    stock = build_stock(case, ours)
    providers[stock_name(case.cell)] = lambda: stock(torch.cat([case.x, case.image.expand(case.T, -1, -1)], dim=-1))[0]
    if getattr(args, "onnx", False):
        onnx_providers(case, ours, stock, providers, skipped)
    if args.stock_only:
        return providers, skipped
    providers["eager loop"] = lambda: eager_loop(case.x, case.image, ours)
    if args.no_compile:
        skipped["torch.compile(loop)"] = "--no-compile"
    elif case.T * case.layers * (2 if case.bidirectional else 1) > args.compile_max_steps:
        skipped["torch.compile(loop)"] = (f"the compiled loop unrolls {case.T * case.layers} steps, over "
                                          f"--compile-max-steps {args.compile_max_steps} (compile time grows with it)")
    else:
        compiled = torch.compile(eager_loop)
        limit = {"expired": False}
        try:
            with _time_limit(args.compile_timeout) as limit:
                compiled(case.x, case.image, ours)  # compile forward ...
                compiled(case.x, case.image, ours).sum().backward()  # ... and backward, untimed
                ours.zero_grad(set_to_none=True)
            if limit["expired"]:
                raise TimeoutError
            providers["torch.compile(loop)"] = lambda: compiled(case.x, case.image, ours)
        except Exception as exc:  # a compiler failure or timeout is reported, not fatal to the benchmark
            if limit["expired"]:  # the alarm may reach us wrapped in the compiler's own exception
                skipped["torch.compile(loop)"] = f"compile took longer than {args.compile_timeout:g} s (--compile-timeout)"
            else:
                skipped["torch.compile(loop)"] = f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return providers, skipped


ONNX_RUNTIME = "ONNX Runtime: "  # the prefix of the inference-only providers --onnx adds


class _ConcatStock(torch.nn.Module):
    """torch's module on the input with the image concatenated onto every step (what users export today)."""

    def __init__(self, stock):
        super().__init__()
        self.stock = stock

    def forward(self, x, image):
        return self.stock(torch.cat([x, image.expand(x.shape[0], -1, -1)], dim=-1))[0]


class _Ours(torch.nn.Module):
    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x, image):
        return self.ours(x, image=image)[0]


def onnx_providers(case: Case, ours, stock, providers: dict, skipped: dict) -> None:
    """--onnx: both models exported with torch.onnx.export(dynamo=True) and run in ONNX Runtime's
    CPUExecutionProvider on as many threads as torch uses — inference only (no training pass),
    float32 on CPU. Added to `providers` (each marked inference_only) or to `skipped` with the reason."""
    names = [ONNX_RUNTIME + OURS, ONNX_RUNTIME + stock_name(case.cell)]
    reason = None
    if case.device.type != "cpu" or case.dtype != torch.float32:
        reason = "ONNX Runtime is timed on CPU in float32"
    else:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            reason = f"missing {', '.join(missing)} (pip install \"mmrnn_ext[export]\")"
    if reason:
        skipped.update({n: reason for n in names})
        return
    import io
    import warnings

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    # ONNX Runtime's pool threads spin after each run by default, taking the cores from whichever
    # provider runs next (measured: mmrnn_ext's eager LSTM 0.56x torch's when timed right after an
    # ONNX Runtime call, above 1x without): they sleep instead, as torch's own pool does
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    feeds = {"x": case.x.detach().numpy(), "image": case.image.detach().numpy()}
    for name, model in zip(names, (_Ours(ours), _ConcatStock(stock))):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, (case.x.detach(), case.image.detach()), dynamo=True,
                                            input_names=["x", "image"], verbose=False)
            session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # reported, not fatal: the other providers still run
            skipped[name] = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            continue

        def run(session=session):
            return torch.from_numpy(session.run(None, feeds)[0])

        run.inference_only = True
        providers[name] = run


# --- measuring ------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Norm-wise relative tolerance between providers for this dtype."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        return 5e-4 if tf32 else 1e-5
    return 1e-2


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    b64 = b.double()
    return ((a.double() - b64).norm() / b64.norm().clamp_min(1e-300)).item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats: int) -> float:
    """Median milliseconds: triton.testing.do_bench on GPU; warm-up then the median of `repeats` on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return statistics.median(cpu_times_ms(fn, repeats))


def cpu_times_ms(fn, repeats: int) -> list:
    """`repeats` timings of fn in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


# Repeats of one measurement whose (max - min) / median exceeds this are reported as disagreeing
# (a busy machine); a rate above the machine's measured ceiling by more than the margin is impossible.
NOISY_SPREAD = 0.30
CEILING_MARGIN = 1.10


def spread(times) -> float:
    """(max - min) / median of repeated timings: 0 when they agree."""
    return (max(times) - min(times)) / statistics.median(times) if times and statistics.median(times) > 0 else 0.0


def paired_table(rows: list, label: tuple, ours: tuple, theirs: tuple, digits: int, what_x: str) -> str:
    """The text table of rows timing ours against torch's side by side: label = (title, width,
    row -> text) columns first, then ours = (title, median key, minimum key) and theirs likewise,
    x, and a ! where the repeats disagree (row["noisy"])."""
    wo, wt = max(len(ours[0]), 10), max(len(theirs[0]), 10)
    lines = ["  " + " ".join(f"{t:{width}}" for t, width, _ in label)
             + f" {ours[0]:>{wo}} {'(min)':>9} {theirs[0]:>{wt}} {'(min)':>9} {'x':>6}"]
    for r in rows:
        lines.append("  " + " ".join(f"{fn(r):{width}}" for _, width, fn in label)
                     + f" {r[ours[1]]:{wo}.{digits}f} {r[ours[2]]:9.{digits}f} {r[theirs[1]]:{wt}.{digits}f}"
                     f" {r[theirs[2]]:9.{digits}f} {r['x']:6.2f}" + (" !" if r["noisy"] else ""))
    lines.append(f"  x = {what_x}; ! = the repeats disagree by more than {100 * NOISY_SPREAD:.0f}% (busy machine)")
    return "\n".join(lines)


def side_by_side_stats(fns: dict, device, repeats: int) -> dict:
    """{name: {"ms": median, "min_ms", "spread"}}. On CPU the providers take turns: each round runs
    every provider twice, an untimed call then a timed one, so that a slow spell of a shared machine
    falls on every provider alike rather than on whichever was being timed, and every timed call
    follows a call of its own (the steady state of a served model, not the cost of switching from
    another provider's memory footprint). On GPU each is timed on its own (triton.testing.do_bench's
    median); min_ms and spread are then None."""
    if device.type == "cuda":
        return {name: {"ms": time_ms(fn, device, repeats), "min_ms": None, "spread": None} for name, fn in fns.items()}
    return {name: {"ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "spread": spread(t)}
            for name, t in cpu_turns(fns, repeats).items()}


def impossible_rate(gflops, ceiling, dtype_name: str) -> bool:
    """A float32/float64 GEMM rate the machine cannot reach (above its big-GEMM ceiling by more
    than CEILING_MARGIN): a timing the machine disturbed, never a speed."""
    return (gflops is not None and ceiling is not None and dtype_name in ("float32", "float64")
            and gflops > CEILING_MARGIN * ceiling)


def cpu_turns(fns: dict, rounds: int) -> dict:
    """{name: [seconds per round]}: in each round every provider runs an untimed call, then a timed
    one (see side_by_side_stats)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def saved_activation_mb(fn) -> float:
    """MB of distinct tensors autograd saves for backward during one forward (parameters excluded)."""
    seen = {}

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2 ** 20


def peak_memory_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def gemm_gflop(case: Case, provider: str, pass_name: str) -> float | None:
    """GEMM GFLOP of one call (one layer, one direction only; None otherwise): the input projection
    (over I + V columns for the concatenating provider, I plus one [B, V] image GEMM for the others),
    the recurrence, and in backward its BPTT products, dW_hh and dW_ih (+ dW_img); the input needs
    no gradient here."""
    if case.layers != 1 or case.bidirectional:
        return None
    B, T, I, V, H = case.B, case.T, case.I, case.V, case.H
    G = CELLS[case.cell][2] * H
    width, image = (I + V, 0) if provider == stock_name(case.cell) else (I, V)
    forward = 2.0 * T * B * width * G + 2.0 * B * image * G + 2.0 * T * B * H * G
    backward = 2 * (2.0 * T * B * G * H) + 2.0 * T * B * width * G + 2.0 * B * image * G
    return (forward if pass_name == "forward" else forward + backward) / 1e9


def recurrence_vs_mm(case: Case, repeats: int, ceiling: float | None = None) -> dict:
    """The fused recurrence alone (auto backend, forward) against T plain GEMMs of its shape
    ([B, H] x [H, G*H], G the cell's gate count)."""
    B, T, H = case.B, case.T, case.H
    G = CELLS[case.cell][2] * H
    g = torch.Generator().manual_seed(1)
    xp = torch.randn(T, B, G, generator=g).to(case.device, case.dtype)
    w = (torch.randn(G, H, generator=g) / math.sqrt(H)).to(case.device, case.dtype)
    h0 = torch.zeros(B, H, device=case.device, dtype=case.dtype)
    a = torch.randn(B, H, generator=g).to(case.device, case.dtype)
    wt = w.t().contiguous()
    out = torch.empty(B, G, device=case.device, dtype=case.dtype)
    run = {"rnn": lambda: mmrnn_ext.rnn_recurrence(xp, w, h0), "lstm": lambda: mmrnn_ext.lstm_recurrence(xp, w, h0, h0),
           "gru": lambda: mmrnn_ext.gru_recurrence(xp, w, None, h0)}[case.cell]

    def op():
        with torch.no_grad():
            run()

    def mm():
        for _ in range(T):
            torch.mm(a, wt, out=out)

    flop = 2.0 * B * H * G * T
    stats = side_by_side_stats({"op": op, "mm": mm}, case.device, repeats)
    op_ms, mm_ms = stats["op"]["ms"], stats["mm"]["ms"]
    dtype_name = str(case.dtype).replace("torch.", "")
    rates = (flop / op_ms / 1e6, flop / mm_ms / 1e6)
    spreads = [stats[k]["spread"] for k in ("op", "mm") if stats[k]["spread"] is not None]
    impossible = any(impossible_rate(r, ceiling, dtype_name) for r in rates)
    return {"shape": list(case.shape), "cell": case.cell, "dtype": dtype_name,
            "backend": _backends.backend_for(xp, cell=case.cell), "recurrence_ms": op_ms,
            "recurrence_gflops": rates[0], "mm_ms": mm_ms, "mm_gflops": rates[1],
            "fraction_of_mm": None if impossible else mm_ms / op_ms, "spread": max(spreads, default=None),
            "impossible_rate": impossible, "noisy": impossible or max(spreads, default=0.0) > NOISY_SPREAD}


def stock_path(fn) -> str:
    """Which implementation torch ran for a call of the stock module, from the aten ops it dispatched:
    cuDNN, oneDNN, or a per-step loop (fused cell kernels, or a GEMM per step: PyTorch's path where
    neither library takes the dtype)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Ops() as ops:
        fn()
    names = ops.names
    if "_cudnn_rnn" in names:
        return "cuDNN (aten::_cudnn_rnn)"
    if "mkldnn_rnn_layer" in names:
        return "oneDNN (aten::mkldnn_rnn_layer)"
    cells = sorted(n for n in names if n.endswith("_cell"))
    if cells:
        return f"a per-step loop of fused cell kernels (aten::{', aten::'.join(cells)})"
    if "addmm" in names or "mm" in names:
        return "a per-step loop of aten ops (a GEMM per step)"
    return "unrecognised (aten ops: " + ", ".join(sorted(names)[:8]) + ")"


def run_case(case: Case, args, progress) -> tuple[list, dict]:
    providers, skipped = make_providers(case, args)
    progress.add_total(2 * len(providers))
    with torch.no_grad():
        reference = providers[OURS]()
        tol = tolerance(DTYPES[args.autocast] if getattr(args, "autocast", None) else case.dtype, case.device)
        diffs, outputs = {}, {}
        for name in [n for n in providers if n != OURS]:
            try:  # another library that cannot run this case here is reported, not fatal
                outputs[name] = providers[name]()
            except RuntimeError as exc:  # e.g. oneDNN has no bf16 LSTM on CPUs without AVX-512
                skipped[name] = f"cannot run here: {str(exc).splitlines()[0][:200]}"
                del providers[name]
        for name, fn in providers.items():
            diffs[name] = relative_difference(outputs[name] if name in outputs else fn(), reference)
            if not diffs[name] <= tol:
                raise DisagreementError(
                    f"{name} disagrees with {OURS} on shape {case.shape} {case.dtype}: relative difference "
                    f"{diffs[name]:.3e} > tolerance {tol:.0e}; refusing to report speeds")
    rows = []
    dtype_name = str(case.dtype).replace("torch.", "")
    stock = stock_name(case.cell)
    paths = {stock: stock_path(providers[stock])} if stock in providers else {}
    case.x.requires_grad_(False)

    def forward_of(fn):
        def forward():
            with torch.no_grad():
                return fn()
        return forward

    def train_step_of(fn):
        def train_step():
            out = fn()
            out.backward(torch.ones_like(out))
        return train_step

    forwards = {name: forward_of(fn) for name, fn in providers.items()}
    train_steps = {name: train_step_of(fn) for name, fn in providers.items() if not getattr(fn, "inference_only", False)}
    fwd_times = side_by_side_stats(forwards, case.device, args.repeats)
    progress.update(len(providers))
    train_times = side_by_side_stats(train_steps, case.device, args.repeats)
    progress.update(len(providers))
    for name, fn in providers.items():
        trains = name in train_steps  # inference-only providers (ONNX Runtime) have no training pass
        saved = saved_activation_mb(fn) if trains else None
        peak = peak_memory_mb(train_steps[name], case.device) if trains else None
        for pass_name, stats in zip(PASSES, (fwd_times[name], train_times.get(name))):
            if stats is None:
                continue
            ms = stats["ms"]
            gflop = gemm_gflop(case, name, pass_name)
            rows.append({"shape": list(case.shape), "B": case.B, "T": case.T, "I": case.I, "V": case.V, "H": case.H,
                         "layers": case.layers, "bidirectional": case.bidirectional, "cell": case.cell,
                         "dtype": dtype_name, "autocast": getattr(args, "autocast", None), "provider": name,
                         "pass": pass_name, "ms": ms, "min_ms": stats["min_ms"], "spread": stats["spread"],
                         "noisy": stats["spread"] is not None and stats["spread"] > NOISY_SPREAD,
                         "gemm_gflop": gflop, "gemm_gflops": None if gflop is None else gflop / ms * 1e3,
                         "saved_activations_mb": saved,
                         "peak_memory_mb": peak if pass_name == "forward+backward" else None,
                         "relative_difference": diffs[name], "path": paths.get(name)})
    ours = {r["pass"]: r["ms"] for r in rows if r["provider"] == OURS}
    ceiling = getattr(args, "ceiling_gflops", None)
    for r in rows:
        r["speedup_of_mmrnn_ext"] = r["ms"] / ours[r["pass"]]
        r["fraction_of_ceiling"] = None if ceiling is None or r["gemm_gflops"] is None else r["gemm_gflops"] / ceiling
        r["impossible_rate"] = (impossible_rate(r["gemm_gflops"], ceiling, r["dtype"]) and not r["autocast"])
        if r["impossible_rate"]:
            r["noisy"] = True
    return rows, skipped


# --- decoding ---------------------------------------------------------------------------------------

def decode_providers(cell: str, B: int, I: int, V: int, H: int, steps: int) -> dict:
    """{name: callable running `steps` decoding steps from a zero state, returning the last h}:
    our cell and torch's cell on the concatenated input, and both modules called with T = 1 and a
    carried state (the concatenation is prepared once, outside the timing: torch's side pays nothing
    for the image). float32, no_grad."""
    ours_cls, stock_cls = CELL_MODULES[cell]
    torch.manual_seed(0)
    ours_cell = ours_cls(I, H, image_size=V)
    stock_cell = stock_cls(I + V, H)
    ours_mod = CELLS[cell][0](I, H, image_size=V)
    stock_mod = CELLS[cell][1](I + V, H)
    with torch.no_grad():
        for name, p in ours_cell.named_parameters():  # one set of weights for all four
            getattr(ours_mod, name + "_l0").copy_(p)
        for o, s_ in ((ours_cell, stock_cell), (ours_mod, stock_mod)):
            suffix = "_l0" if o is ours_mod else ""
            for name, p in s_.named_parameters():
                src = getattr(o, name)
                if name == "weight_ih" + suffix:
                    p.copy_(torch.cat([src, getattr(o, "weight_img" + suffix)], dim=1))
                else:
                    p.copy_(src)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, B, I, generator=g)
    v = torch.randn(B, V, generator=g)
    xc = torch.cat([x, v.expand(steps, -1, -1)], dim=-1)
    lstm = cell == "lstm"

    def zeros(*lead):
        z = torch.zeros(*lead, B, H)
        return (z, z.clone()) if lstm else z

    def first(state):
        return state[0] if lstm else state

    def ours_cell_run():
        state = zeros()
        for t in range(steps):
            state = ours_cell(x[t], state, image=v)
        return first(state)

    def stock_cell_run():
        state = zeros()
        for t in range(steps):
            state = stock_cell(xc[t], state)
        return first(state)

    def ours_mod_run():
        state = zeros(1)
        for t in range(steps):
            _, state = ours_mod(x[t:t + 1], state, image=v)
        return first(state)[0]

    def stock_mod_run():
        state = zeros(1)
        for t in range(steps):
            _, state = stock_mod(xc[t:t + 1], state)
        return first(state)[0]

    return {f"{OURS} cell": ours_cell_run, f"nn.{cell.upper()}Cell(concat)": stock_cell_run,
            f"{OURS} module T=1": ours_mod_run, f"{stock_name(cell)} T=1": stock_mod_run}


def decode_rows(cell: str, shapes, rounds: int, steps: int = DECODE_STEPS) -> list:
    """µs per decoding step for every provider (rounds of `steps` steps taking turns, as
    side_by_side_stats): median and minimum over the rounds; outputs checked against ours first."""
    rows = []
    for B, I, V, H in shapes:
        providers = decode_providers(cell, B, I, V, H, steps)
        with torch.no_grad():
            reference = providers[f"{OURS} cell"]()
            for name, fn in providers.items():
                diff = relative_difference(fn(), reference)
                if not diff <= tolerance(torch.float32, torch.device("cpu")):
                    raise DisagreementError(f"decode: {name} disagrees with {OURS} cell at (B,I,V,H) = "
                                            f"{(B, I, V, H)}: relative difference {diff:.3e}")
            times = {name: [t / steps * 1e6 for t in ts] for name, ts in cpu_turns(providers, rounds).items()}
        stock_cell = times[f"nn.{cell.upper()}Cell(concat)"]
        for name, t in times.items():
            rows.append({"cell": cell, "B": B, "I": I, "V": V, "H": H, "provider": name,
                         "us_per_step": statistics.median(t), "us_per_step_min": min(t), "rounds": rounds,
                         "steps_per_round": steps,
                         "torch_cell_over_this": statistics.median(stock_cell) / statistics.median(t)})
    return rows


def format_decode(rows: list) -> str:
    lines = [f"  {'cell':5} {'B,I,V,H':16} {'provider':28} {'us/step':>9} {'min':>9} {'torch cell / this':>18}"]
    for r in rows:
        shape = f"{r['B']},{r['I']},{r['V']},{r['H']}"
        lines.append(f"  {r['cell']:5} {shape:16} {r['provider']:28} {r['us_per_step']:9.1f} {r['us_per_step_min']:9.1f} "
                     f"{r['torch_cell_over_this']:18.2f}")
    return "\n".join(lines)


# --- reporting ------------------------------------------------------------------------------------

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict:
    """The CPU's model name, vendor and the vector-relevant flags (/proc/cpuinfo), and the vector
    path mmrnn_ext's engine takes on it."""
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_vendor": None, "cpu_flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    info["cpu_model"] = value
                elif key == "vendor_id":
                    info["cpu_vendor"] = value
                elif key == "flags":
                    info["cpu_flags"] = [f for f in CPU_FLAGS if f in value.split()]
                    break
    except OSError:
        pass
    cpp = _backends._cpp()[0]
    info["engine_isa"] = None if cpp is None else cpp.cpu_isa()
    return info


def gemm_ceiling(repeats: int = 5, n: int = 2048) -> dict:
    """The machine's big-GEMM rate in float32 GF/s: an n^3 product through torch.mm (the BLAS torch
    ships) and through oneDNN's linear with prepacked weights where torch has it, each the best of
    `repeats` (a ceiling, not a typical time); the better is the ceiling every GF/s figure is
    compared with."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    flop = 2.0 * n ** 3

    def best_ms(fn):
        return min(cpu_times_ms(fn, repeats))

    rates = {"torch.mm": flop / best_ms(lambda: torch.mm(a, b)) / 1e6}
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
        onednn()
        rates["oneDNN linear"] = flop / best_ms(onednn) / 1e6
    except (AttributeError, RuntimeError):  # a torch without oneDNN's linear: torch.mm alone
        pass
    best = max(rates, key=rates.get)
    return {"gflops": rates[best], "by": best, "rates": rates, "n": n}


def machine_info(device: torch.device) -> dict:
    cpu_info = cpu_description()
    cpu = cpu_info["cpu_model"]
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}",
            **cpu_info, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32"] = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return info


def format_table(rows: list) -> str:
    lines = []
    key = lambda r: (tuple(r["shape"]), r["dtype"])  # noqa: E731
    for shape_dtype in dict.fromkeys(key(r) for r in rows):
        group = [r for r in rows if key(r) == shape_dtype]
        shape, dtype = shape_dtype
        path = next((r["path"] for r in group if r.get("path")), None)
        amp = group[0].get("autocast")
        dtype = f"{dtype} under autocast {amp}" if amp else dtype
        lines.append(f"\nshape (B, T, I, V, H) = {shape}, {dtype}" + (f"; torch ran {path}" if path else ""))
        width = max(26, 2 + max(len(r["provider"]) for r in group))
        lines.append(f"  {'provider':<{width}}{'inference ms':>13}{'x':>8}{'GF/s':>7}{'%ceil':>6}{'fwd+bwd ms':>12}{'x':>8}"
                     f"{'GF/s':>7}{'%ceil':>6}{'saved MB':>10}{'rel diff':>10}")

        def rate(r):
            if r.get("impossible_rate"):
                return f"{'n/a':>7}{'':>6}"
            if r.get("gemm_gflops") is None:
                return f"{'':>7}{'':>6}"
            frac = r.get("fraction_of_ceiling")
            return f"{r['gemm_gflops']:>7.1f}" + (f"{100 * frac:>5.0f}%" if frac is not None else f"{'':>6}")

        for name in dict.fromkeys(r["provider"] for r in group):
            f = next(r for r in group if r["provider"] == name and r["pass"] == "forward")
            b = next((r for r in group if r["provider"] == name and r["pass"] == "forward+backward"), None)
            mark = lambda r: "!" if r.get("noisy") else " "  # noqa: E731
            train = (f"{b['ms']:>11.3f}{mark(b)}{b['speedup_of_mmrnn_ext']:>7.2f}x{rate(b)}" if b is not None else
                     f"{'inference only':>33}")
            saved = f"{f['saved_activations_mb']:>10.1f}" if f["saved_activations_mb"] is not None else f"{'-':>10}"
            lines.append(f"  {name:<{width}}{f['ms']:>12.3f}{mark(f)}{f['speedup_of_mmrnn_ext']:>7.2f}x{rate(f)}{train}"
                         f"{saved}{f['relative_difference']:>10.1e}")
    lines.append("\n  inference = the forward under torch.no_grad; x = that provider's time / mmrnn_ext's time (above 1:\n"
                 "  mmrnn_ext is faster); GF/s = the pass's GEMM FLOPs (its own algorithm's) over its time; %ceil = that\n"
                 "  rate over the machine's big-GEMM rate; ! = that measurement's repeats disagree (see below)")
    note = noise_note(rows)
    if note:
        lines.append(note)
    return "\n".join(lines)


def format_recurrence(r: dict) -> str:
    if r.get("impossible_rate"):
        return (f"{r['recurrence_ms']:.2f} ms vs torch.mm {r['mm_ms']:.2f} ms: no rate reported (one exceeds the "
                f"machine's big-GEMM ceiling: the machine disturbed the timing; rerun on a quiet machine)")
    note = (f"  ! repeats disagree by {100 * r['spread']:.0f}% (busy machine?)" if r.get("noisy") else "")
    return (f"{r['recurrence_ms']:.2f} ms, {r['recurrence_gflops']:.1f} GF/s vs torch.mm {r['mm_gflops']:.1f} GF/s "
            f"({100 * r['fraction_of_mm']:.0f}%)" + note)


def noise_note(rows: list) -> str:
    """The table's warning when repeats disagreed or a rate was impossible ('' when none did)."""
    noisy = [r for r in rows if r.get("noisy")]
    if not noisy:
        return ""
    worst = max((r["spread"] or 0.0) for r in noisy)
    impossible = sum(1 for r in noisy if r.get("impossible_rate"))
    return (f"\n  ! {len(noisy)} of {len(rows)} measurements are unreliable: their repeats disagree by more than "
            f"{100 * NOISY_SPREAD:.0f}% (worst {100 * worst:.0f}%)" + (f", {impossible} gave a GEMM rate above the "
            f"machine's ceiling (shown as 'n/a')" if impossible else "") +
            ": the machine was busy; their ratios may be wrong — rerun on a quiet machine")


def markdown_table(result: dict) -> str:
    """The README table from a results JSON."""
    rows = result["rows"]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != OURS]
    head = ("| shape (B,T,I,V,H) | dtype | pass | mmrnn_ext ms (saved MB) | "
            + " | ".join(f"{p} ms (x, saved MB)" for p in providers) + " |")
    lines = [head, "|" + " --- |" * (4 + len(providers))]
    key = lambda r: (tuple(r["shape"]), r["dtype"], r["pass"])  # noqa: E731
    for k in dict.fromkeys(key(r) for r in rows):
        group = {r["provider"]: r for r in rows if key(r) == k}
        cells = []
        for p in providers:
            r = group.get(p)
            if r is None:
                cells.append("inference only" if p.startswith(ONNX_RUNTIME) else "skipped")
            elif r["saved_activations_mb"] is None:
                cells.append(f"{r['ms']:.2f} ({r['speedup_of_mmrnn_ext']:.2f}x)")
            else:
                cells.append(f"{r['ms']:.2f} ({r['speedup_of_mmrnn_ext']:.2f}x, {r['saved_activations_mb']:.1f})")
        ours = group[OURS]
        lines.append(f"| {','.join(map(str, k[0]))} | {k[1]} | {k[2]} | {ours['ms']:.2f} ({ours['saved_activations_mb']:.1f}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["rows"]
    others = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != OURS]
    labels = list(dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(min(18, max(8, 1.1 * len(labels) + 3)), 9), sharey=True)
    width = 0.8 / max(1, len(others))
    speedups = [r["speedup_of_mmrnn_ext"] for r in rows if r["provider"] != OURS] or [1.0]
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
             if min(speedups) / 2 <= t <= max(speedups) * 2]
    for ax, pass_name in zip(axes, PASSES):
        for i, p in enumerate(others):
            ys = []
            for shape, dtype in labels:
                r = next((r for r in rows if tuple(r["shape"]) == shape and r["dtype"] == dtype
                          and r["provider"] == p and r["pass"] == pass_name), None)
                ys.append(r["speedup_of_mmrnn_ext"] if r else 0)
            ax.bar([j + i * width for j in range(len(labels))], ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(axis="y", linewidth=0.3)
        ax.set_title(pass_name)
        ax.set_xticks([j + width * (len(others) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"{','.join(map(str, s[:3]))},\n{','.join(map(str, s[3:]))}\n{d}" for s, d in labels],
                           fontsize=7)
    axes[1].set_xlabel("shape (B,T,I,V,H), dtype")
    for ax in axes:
        ax.set_ylabel("provider time / mmrnn_ext's")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mmrnn_ext speedup — {result['machine']['device']}, torch {result['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _Progress:
    """A progress bar on stderr (tqdm when installed) when stderr is a terminal; nothing otherwise."""

    def __init__(self):
        self._n = self._total = 0
        self._quiet = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        try:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (a log file, CI)
            self._bar = tqdm(total=0, file=sys.stderr, desc="mmrnn-bench", leave=False, disable=None)
        except ImportError:
            self._bar = None

    def add_total(self, n):
        self._total += n
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def update(self, n):
        if self._bar is not None:
            self._bar.update(n)
        elif not self._quiet:
            self._n += n
            print(f"\rmmrnn-bench {self._n}/{self._total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif not self._quiet:
            print(file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmrnn-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", metavar="B,T,I,V,H",
                   help="batch,seq,input,image,hidden (repeatable; default: the device's grid)")
    p.add_argument("--dtype", default=None, help="comma-separated: float32,float64,bfloat16,float16 (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cell", choices=list(CELLS), default="rnn", help="the recurrent cell (default rnn)")
    p.add_argument("--layers", type=_cli.positive_int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--all-backends", action="store_true", help="also time each available mmrnn_ext backend")
    p.add_argument("--quick", action="store_true", help="a small grid, few repeats, no torch.compile")
    p.add_argument("--grid", choices=["default", "serving"], default="default",
                   help="the shapes when no --shape is given: the device's default grid, or (CPU) the serving grid "
                        "(B,T,I,V,H) = " + " ".join(",".join(map(str, s)) for s in SERVING_GRID))
    p.add_argument("--autocast", choices=["bfloat16"], default=None,
                   help="run every provider under torch.autocast('cpu', <dtype>) (float32 models; CPU only)")
    p.add_argument("--decode", action="store_true",
                   help="time decoding instead of the grid: us per cell step at B=1 and B=16 (CPU, float32, no_grad)")
    p.add_argument("--train-step", action="store_true",
                   help="time the cells with gradients instead of the grid: one step forward+backward and forward "
                        "with grad enabled for every cell against torch's cell, and the attention decoder's training "
                        "step (CPU, float32)")
    p.add_argument("--migrate", action="store_true",
                   help="time two torch models (a 2-layer bidirectional GRU speech encoder, an LSTM text classifier) "
                        "served with no_grad before and after mmrnn_ext.convert (CPU, float32)")
    p.add_argument("--onnx", action="store_true",
                   help="also time both models exported to ONNX and run in ONNX Runtime (inference only; CPU, float32)")
    p.add_argument("--stock-only", action="store_true",
                   help="time mmrnn_ext against torch's own module only (no eager loop, no torch.compile)")
    p.add_argument("--repeats", type=_cli.positive_int, default=None, help="CPU timing repeats (median; default 5, quick 3)")
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="TF32 for float32 on CUDA (sets torch.backends.cudnn/cuda.matmul.allow_tf32)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--compile-max-steps", type=_cli.non_negative_int, default=64, help="skip torch.compile above this many unrolled steps")
    p.add_argument("--compile-timeout", type=_cli.positive_float, default=240.0, help="seconds allowed for torch.compile")
    p.add_argument("--no-recurrence", action="store_true", help="skip the recurrence-vs-torch.mm GF/s section")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write the speedups as a grouped bar chart")
    p.add_argument("--markdown", metavar="RESULTS.json", help="print the README table of a results JSON and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)))
        return 0
    if args.plot:
        _cli.require("mmrnn-bench", {"matplotlib": "--plot"}, "bench")
    _cli.writable_file("mmrnn-bench", "--json", args.json)
    _cli.writable_file("mmrnn-bench", "--plot", args.plot)
    device = _cli.device("mmrnn-bench", args.device)
    if (args.autocast or args.decode or args.train_step or args.migrate) and device.type != "cpu":
        flag = ("--autocast" if args.autocast else "--decode" if args.decode else "--train-step" if args.train_step
                else "--migrate")
        raise SystemExit(f"{flag}: a CPU measurement; use --device cpu")
    for on, flag in ((args.train_step, "--train-step"), (args.migrate, "--migrate")):
        others = [f for f, given in (("--decode", args.decode), ("--autocast", args.autocast), ("--onnx", args.onnx),
                                     ("--shape", args.shape), ("--train-step", args.train_step),
                                     ("--migrate", args.migrate)) if given and f != flag]
        if on and others:
            raise SystemExit(f"{flag}: its shapes are fixed and it runs alone (without --decode, --autocast, --onnx, "
                             f"--shape, --train-step, --migrate); got {' '.join(others)}")
    if args.onnx and (args.autocast or args.decode or device.type != "cpu"):
        raise SystemExit("--onnx: ONNX Runtime is timed on the grid, on CPU, without autocast")
    if args.onnx:
        _cli.require("mmrnn-bench", {m: "--onnx" for m in ("onnx", "onnxscript", "onnxruntime")}, "export")
    if args.autocast and args.dtype not in (None, "float32"):
        raise SystemExit(f"--autocast: autocast runs float32 models; got --dtype {args.dtype}")
    if args.decode:
        return decode_main(args, device)
    if args.train_step:
        return train_step_main(args, device)
    if args.migrate:
        return migrate_main(args, device)
    if args.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    dtype_names = (args.dtype or "float32").split(",")
    for name in dtype_names:
        if name not in DTYPES:
            raise SystemExit(f"--dtype: expected some of {list(DTYPES)}, got {name!r}")
    if args.shape:
        shapes = []
        for s in args.shape:
            parts = s.split(",")
            if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise SystemExit(f"--shape: expected five positive integers B,T,I,V,H, got {s!r}")
            shapes.append(tuple(int(p) for p in parts))
    else:
        grids = {("cpu", False): CPU_GRID, ("cpu", True): QUICK_CPU_GRID,
                 ("cuda", False): GPU_GRID, ("cuda", True): QUICK_GPU_GRID}
        if args.grid == "serving" and device.type != "cpu":
            raise SystemExit("--grid serving: the serving grid is a CPU grid; use --device cpu")
        shapes = SERVING_GRID if args.grid == "serving" else grids[(device.type, args.quick)]
    if args.quick:
        args.no_compile = True if not args.shape else args.no_compile
    args.repeats = args.repeats or (3 if args.quick else 5)
    cases = [(s, DTYPES[d]) for s in shapes for d in dtype_names]
    machine = machine_info(device)
    if device.type == "cpu":
        machine["gemm_ceiling"] = gemm_ceiling()
        args.ceiling_gflops = machine["gemm_ceiling"]["gflops"]
        print(f"mmrnn-bench: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path {machine['engine_isa']}); "
              f"big-GEMM ceiling {args.ceiling_gflops:.0f} GF/s ({machine['gemm_ceiling']['by']}, 2048^3 float32)",
              flush=True)
    progress = _Progress()
    rows, skipped, recurrence, failures = [], [], [], []
    for shape, dtype in cases:
        case = Case(*shape, dtype=dtype, device=device, layers=args.layers, bidirectional=args.bidirectional,
                    cell=args.cell)
        try:
            case_rows, case_skipped = run_case(case, args, progress)
        except DisagreementError as exc:  # no speed for this case; the others still run, the exit code is 1
            print(f"mmrnn-bench: FAILED: {exc}", file=sys.stderr)
            failures.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "error": str(exc)})
            continue
        rows += case_rows
        skipped += [{"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "provider": k, "reason": v}
                    for k, v in case_skipped.items()]
        if not args.no_recurrence:
            recurrence.append(recurrence_vs_mm(case, args.repeats, getattr(args, "ceiling_gflops", None)))
    progress.close()
    result = {"machine": machine, "cell": args.cell, "layers": args.layers,
              "bidirectional": args.bidirectional, "noisy_spread_threshold": NOISY_SPREAD,
              "unreliable": sum(1 for r in rows + recurrence if r.get("noisy")),
              "rows": rows, "skipped": skipped, "recurrence": recurrence, "failures": failures}
    print(f"mmrnn-bench --cell {args.cell} on {result['machine']['device']} (torch {torch.__version__}, "
          f"{os.cpu_count()} cores)")
    print(format_table(rows))
    for s in skipped:
        print(f"  skipped {s['provider']} at {s['shape']} {s['dtype']}: {s['reason']}")
    if recurrence:
        print(f"\nrecurrence alone (forward) vs T x torch.mm of the same [B,H]x[H,{CELLS[args.cell][2]}H] GEMM:")
        for r in recurrence:
            print(f"  {r['shape']} {r['dtype']} [{r['backend']}]: " + format_recurrence(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if failures:
        print(f"mmrnn-bench: FAILED: {len(failures)} case(s) disagreed; no speed is reported for them", file=sys.stderr)
        return 1
    return 0


def train_step_main(args, device) -> int:
    from . import bench_train_step as ts

    return _fixed_cases_main(args, device, "--train-step", "train_step", ts.train_step_rows, ts.format_rows)


def migrate_main(args, device) -> int:
    from . import bench_migrate as mg

    return _fixed_cases_main(args, device, "--migrate", "migrate", mg.migrate_rows, mg.format_rows)


def _fixed_cases_main(args, device, flag, key, rows_of, format_rows) -> int:
    """A measurement with its own fixed cases (--train-step, --migrate): rows_of(quick, rounds) ->
    rows, printed with format_rows and written as {"machine", key: rows} to --json."""
    machine = machine_info(device)
    rounds = args.repeats or (3 if args.quick else 7)
    print(f"mmrnn-bench {flag}: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path "
          f"{machine['engine_isa']}), torch {torch.__version__}, {machine['torch_threads']} threads, {rounds} rounds",
          flush=True)
    try:
        rows = rows_of(args.quick, rounds)
    except DisagreementError as exc:
        print(f"mmrnn-bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, key: rows, "noisy_spread_threshold": NOISY_SPREAD}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def decode_main(args, device) -> int:
    if args.shape:
        raise SystemExit("--decode: the decoding shapes are fixed (B,I,V,H) = "
                         f"{DECODE_SHAPES}; --shape applies to the grid")
    machine = machine_info(device)
    shapes = QUICK_DECODE_SHAPES if args.quick else DECODE_SHAPES
    rounds = args.repeats or (3 if args.quick else 9)
    print(f"mmrnn-bench --decode --cell {args.cell}: {machine['cpu_model']} ({machine['cpu_vendor']}; engine path "
          f"{machine['engine_isa']}), torch {torch.__version__}, {DECODE_STEPS} steps a round, {rounds} rounds",
          flush=True)
    try:
        rows = decode_rows(args.cell, shapes, rounds)
    except DisagreementError as exc:
        print(f"mmrnn-bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print(format_decode(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "cell": args.cell, "decode": rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
