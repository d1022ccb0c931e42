"""Every Triton kernel the launchers pick, compiled for Hopper (sm_90: H100, H200) on a machine with
no GPU: Triton's own code generator and ptxas, nothing launched. It records the launches the
launchers would make (the exact kernels, argument dtypes, constexprs, tiles and warps, with the SM
count of an H100 for the cooperative form's tiles), compiles each once and reports shared memory,
registers and spill stack (cuobjdump). A kernel that fails to compile, or asks for more shared memory
than a Hopper SM gives one program (227 KiB), is a failure: exit 1.

    python bench/sm90_resources.py OUT.json [--quick]

What it checks that the interpreter cannot: that the code compiles for the GPU at all (the
interpreter accepts things the compiler refuses), and that the persistent form's size bound
(kernels.persistent_fits) keeps W_hh within shared memory. What it cannot check: speed, and the
numbers a GPU computes (bench/gpu_check.sh)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("sm90_resources: unset TRITON_INTERPRET (it compiles the kernels; the interpreter runs them)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmrnn_ext.kernels import gru, launch, lstm, rnn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # a Hopper SM's shared memory for one program (the opt-in maximum)
H100_SMS = 132
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# float32 dots: "tf32" (TF32 allowed), "tf32x3" and "ieee" (TF32 off: the launcher picks by size)
FP32_DOTS = ("tf32", "tf32x3", "ieee")


class _Recorder:
    """Stands in for a kernel: kernel[grid](*args, **kw) records the launch instead of running it."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.fn, grid, args, kw))


@contextlib.contextmanager
def recording():
    """Replace every @triton.jit kernel the launchers call with a recorder; SM count of an H100."""
    calls, saved = [], []
    for mod in (rnn, lstm, gru):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, calls))
    saved.append((launch, "_resident_programs", launch._resident_programs))
    launch._resident_programs = lambda device: H100_SMS
    try:
        yield calls
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def launches(cell: str, B: int, H: int, dtype: torch.dtype, form: str, fp32_dot: str | None):
    """The distinct kernel launches of one forward and one backward (T = 2, lengths and a per-step image:
    the most code) on meta tensors, as the launchers make them for a GPU at this size."""
    meta = dict(device="meta", dtype=dtype)
    T, G = 2, {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    xp, img = torch.empty(T, B, G * H, **meta), torch.empty(T, B, G * H, **meta)
    w, h0, lens = torch.empty(G * H, H, **meta), torch.empty(B, H, **meta), torch.empty(B, dtype=torch.int64, device="meta")
    out_h = torch.empty(T, B, H, **meta)
    with recording() as calls:
        cfg = launch.default_config(B, H, dtype, torch.device("cuda"), form)
        if fp32_dot:
            cfg = cfg._replace(fp32_dot=fp32_dot)
        if dtype != torch.float32:
            cfg = cfg._replace(fast_tanh=True)  # as on a GPU (kernels.launch.fast_tanh)
        fwd_cfg = cfg  # the gated persistent forward refuses "ieee" (see kernels/launch.py plan): tf32x3 there
        if cell != "rnn" and form == "persistent" and fp32_dot == "ieee":
            fwd_cfg = cfg._replace(fp32_dot="tf32x3")
        if cell == "rnn":
            out = rnn.rnn_forward(xp, w, h0, img, lens, "tanh", form=form, config=cfg)
            rnn.rnn_backward(out, h0, out, h0, w, lens, "tanh", form=form, config=cfg)
        elif cell == "lstm":
            out, c_all, gates = lstm.lstm_forward(xp, w, h0, h0, img, lens, form=form, config=fwd_cfg)
            lstm.lstm_backward(out, h0, h0, out, c_all, gates, h0, h0, w, lens, form=form, config=cfg)
        else:
            out, gates = gru.gru_forward(xp, w, h0[0], h0, img, lens, form=form, config=fwd_cfg)
            gru.gru_backward(out_h, h0, out, gates, h0, w, lens, form=form, config=cfg)
    distinct = {}
    for fn, _grid, args, kw in calls:
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in kw.items())))
        distinct.setdefault(key, (fn, args, kw))
    return list(distinct.values())


def compile_for_sm90(fn, args, kw) -> dict:
    """Compile one recorded launch for sm_90 -> {"shared": bytes, "registers", "stack"} (cuobjdump)."""
    params = fn.params
    options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    constexprs = {p.name: kw[p.name] for p in params if p.is_constexpr}
    signature = {}
    for p, a in zip((p for p in params if not p.is_constexpr), args):
        if isinstance(a, torch.Tensor):
            signature[p.name] = "*" + _TYPES[a.dtype]
        elif isinstance(a, int):
            signature[p.name] = "i32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} is a {type(a).__name__}")
    for p in params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET, options=options)
    usage = {"shared": kernel.metadata.shared, "registers": None, "stack": None}
    cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmrnn_sm90_{os.getpid()}.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    os.remove(cubin)
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
            usage["registers"], usage["stack"] = int(fields["REG"]), int(fields["STACK"])
    return usage


def cases(quick: bool):
    """(cell, B, H, dtype name, form, fp32_dot): every form at the sizes that decide its resources: the
    persistent form at its bound (past it, ptxas spends minutes on kernels that spill W_hh and ask
    for 2-4x the shared memory: bench/NOTES.md), the cooperative and step forms at the benchmark's
    hidden sizes."""
    out = []
    for cell, gates in (("rnn", 1), ("lstm", 4), ("gru", 3)):
        for dname, dtype in DTYPES.items():
            dots = FP32_DOTS if dtype == torch.float32 else (None,)
            bound = max(h for h in (16, 32, 64, 128, 256, 512) if launch.persistent_fits(h, dtype, gates))
            for dot in dots:
                out.append((cell, 64, bound, dname, "persistent", dot))
                for H in ((1024,) if quick else (128, 256, 512, 1024)):
                    out.append((cell, 64, H, dname, "cooperative", dot))
                if not quick or dot in (None, "tf32"):
                    out.append((cell, 64, 512, dname, "step", dot))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--quick", action="store_true", help="the persistent bound, hidden 1024 cooperative, step 512")
    p.add_argument("--cell", default="rnn,lstm,gru")
    args = p.parse_args(argv)
    cells = args.cell.split(",")
    rows, failed, start, seen = [], 0, time.time(), set()
    for cell, B, H, dname, form, dot in cases(args.quick):
        if cell not in cells:
            continue
        dtype = DTYPES[dname]
        for fn, fargs, kw in launches(cell, B, H, dtype, form, dot):
            key = (fn.__name__, H, dname, tuple(sorted((k, str(v)) for k, v in kw.items())))
            if key in seen:  # e.g. the gated persistent forward under "ieee" is the tf32x3 one
                continue
            seen.add(key)
            dot = kw.get("FP32_DOT") if dtype == torch.float32 else None  # what the launch really uses
            row = {"cell": cell, "B": B, "H": H, "dtype": dname, "form": form, "fp32_dot": dot, "kernel": fn.__name__,
                   "num_warps": kw.get("num_warps")}
            try:
                row.update(compile_for_sm90(fn, fargs, kw))
                row["ok"] = row["shared"] <= SHARED_LIMIT
            except Exception as e:  # noqa: BLE001 - reported and counted
                e = e.__cause__ or e  # Triton's CompilationError wraps the reason
                row.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[-400:]}", ok=False)
            failed += not row["ok"]
            rows.append(row)
            use = (f"shared {row['shared'] / 1024:6.1f} KiB  regs {row['registers']}  stack {row['stack']}"
                   if "shared" in row else row["error"])
            print(f"{cell:4s} {dname:8s} {form:11s} {dot or '':6s} B{B} H{H:<5d} {fn.__name__:28s} {use}"
                  f"{'' if row['ok'] else '  FAILED'}", flush=True)
    result = {"target": "sm_90 (Hopper: H100, H200), compiled offline, no GPU", "triton": triton.__version__,
              "torch": torch.__version__, "shared_limit_bytes": SHARED_LIMIT, "rows": rows,
              "seconds": round(time.time() - start, 1)}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}: {len(rows)} kernels, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
