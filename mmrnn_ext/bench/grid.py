"""The grid measurement: one case, every provider and pass, checked, timed and measured."""

from __future__ import annotations


import torch

from .cases import Case, DTYPES, DisagreementError, OURS, PASSES, stock_name
from .machine import gemm_gflop
from .memory import peak_memory_mb, saved_activation_mb
from .providers import make_providers, relative_difference, stock_path, tolerance
from .timing import NOISY_SPREAD, impossible_rate, side_by_side_stats


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
        # the gradient arriving at the output (ones) is made once, outside the timing, as the input
        # is: in a training step the layer above makes it (a fresh [T, B, H] fill each call cost
        # 0.1-1 ms of a 12-40 ms step on the 2-core Zen 4 EPYC, every provider alike)
        grad = []

        def train_step():
            out = fn()
            if not grad or grad[0].shape != out.shape or grad[0].dtype != out.dtype:
                grad[:] = [torch.ones_like(out)]
            out.backward(grad[0])
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
