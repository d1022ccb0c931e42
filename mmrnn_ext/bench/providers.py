"""The providers timed beside mmrnn_ext: torch's module on the concatenated input, the eager loop, torch.compile of it, ONNX Runtime; the output checks and which path torch took."""

from __future__ import annotations

import contextlib
import signal

import torch
import torch.nn.functional as F

import mmrnn_ext
from mmrnn_ext import _backends
from .cases import Case, DTYPES, OURS, build_ours, build_stock, stock_name

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
