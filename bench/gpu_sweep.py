"""The Triton kernels alone on a GPU: every form and a few tile configs per shape, forward and
backward, each checked against the float64 reference at the benchmark shape before it is timed.

    python3 bench/gpu_sweep.py OUT.json [--quick]

It is how the size rule in kernels/rnn.py (choose_form, default_config) was chosen: the rows name
form, tiles, warps, programs, median ms (triton.testing.do_bench) and microseconds per step.
The relative error of each variant is recorded (a value over the dtype's tolerance marks the row
FAILED and the run exits 1): the cooperative form's grid barrier is only exercised with many
programs on a real GPU, so this is also its race check at full size."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmrnn_ext import _backends  # noqa: E402
from mmrnn_ext.bench import GPU_GRID, QUICK_GPU_GRID, machine_info  # noqa: E402
from mmrnn_ext.reference import reference_backward, reference_forward  # noqa: E402

# float32 runs with TF32 as torch has it by default (allowed); "float32-notf32" with TF32 off
DTYPES = {"bfloat16": (torch.bfloat16, 1e-2), "float16": (torch.float16, 1e-2), "float32": (torch.float32, 5e-4),
          "float32-notf32": (torch.float32, 1e-5)}


def variants(kernels, B, H, dtype, device, wide, x3=False):
    """(form, Config) pairs to try at this size; wide: more tile configs, and the exact tanh;
    x3: float32 with TF32 off also through the FMA dot ("ieee"; the default splits by size)."""
    out = []
    if kernels.persistent_fits(H, dtype):
        pbase = kernels.default_config(B, H, dtype, device, "persistent")
        out.append(("persistent", pbase))
        if wide:
            out += [("persistent", pbase._replace(num_warps=8)), ("persistent", pbase._replace(fast_tanh=False))]
        if x3:
            out.append(("persistent", pbase._replace(fp32_dot="ieee")))
    base = kernels.default_config(B, H, dtype, device, "cooperative")
    tries = [base] + ([base._replace(fp32_dot="ieee")] if x3 else [])
    if wide:
        tries += [base._replace(block_n=base.block_n * 2), base._replace(block_b=max(16, base.block_b // 2)),
                  base._replace(block_k=max(16, base.block_k // 2)), base._replace(fast_tanh=False)]
    seen = set()
    for cfg in tries:
        hp = max(16, triton.next_power_of_2(H))
        if cfg not in seen and cfg.block_n <= hp and cfg.block_k <= hp:
            seen.add(cfg)
            out.append(("cooperative", cfg))
    return out


def rel(a, b):
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="bfloat16,float16,float32,float32-notf32",
                   help="comma-separated; only bfloat16 tries the wider set of tile configs")
    p.add_argument("--shape", action="append", metavar="B,T,I,V,H", help="instead of the GPU grid (repeatable)")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the kernels through TRITON_INTERPRET=1 (a test)")
    p.add_argument("--jobs", type=int, default=1, help="compile the variants in this many processes first")
    p.add_argument("--part", default=None, help="I/N: only compile every N-th variant from the I-th (a --jobs worker)")
    args = p.parse_args(argv)
    if args.jobs > 1 and args.part is None:  # fill Triton's on-disk cache in parallel, then time in one process
        argv_rest = [a for a in (sys.argv[1:] if argv is None else argv)]
        workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv_rest, "--part", f"{i}/{args.jobs}"])
                   for i in range(args.jobs)]
        if any(w.wait() for w in workers):
            print("gpu_sweep: a compile worker failed (the timed pass below reports the variant)", flush=True)
    part, parts = (int(v) for v in args.part.split("/")) if args.part else (0, 1)
    kernels = _backends._kernels()[0]
    if kernels is None:
        raise SystemExit(f"the Triton kernels are unavailable: {_backends._kernels()[1]}")
    dev = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else (
        QUICK_GPU_GRID if args.quick else GPU_GRID)

    def time_ms(fn):
        if dev.type == "cuda":
            return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    rows, failed, index = [], 0, -1
    t_start = time.time()
    for (B, T, _I, _V, H) in shapes:
        g = torch.Generator().manual_seed(0)
        xp64 = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(dev)
        w64 = (torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dev)
        h064 = (0.5 * torch.randn(B, H, generator=g, dtype=torch.float64)).to(dev)
        img64 = torch.randn(B, H, generator=g, dtype=torch.float64).to(dev)
        gy64 = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(dev)
        ghl64 = torch.randn(B, H, generator=g, dtype=torch.float64).to(dev)
        for dname in args.dtype.split(","):
            dtype, tol = DTYPES[dname]
            tf32 = dname != "float32-notf32"
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            wide = dtype == torch.bfloat16
            xp, w, h0, img, gy, ghl = (t.to(dtype) for t in (xp64, w64, h064, img64, gy64, ghl64))
            if args.part:  # a compile worker: run each of its variants once
                for form, cfg in variants(kernels, B, H, dtype, dev, wide, x3=not tf32):
                    index += 1
                    if index % parts == part:
                        out = kernels.rnn_forward(xp, w, h0, img, None, "tanh", form=form, config=cfg)
                        kernels.rnn_backward(gy, ghl, out, h0, w, None, "tanh", form=form, config=cfg)
                continue
            # the reference sees the same (rounded) inputs, in float64
            out64 = reference_forward(xp.double(), w.double(), h0.double(), img.double(), None, "tanh")
            out_ref = out64.to(dtype)  # the backward kernels and their reference read the same rounded h
            dA64, dh064 = reference_backward(gy.double(), ghl.double(), out_ref.double(), h0.double(), w.double(),
                                             None, "tanh")
            for form, cfg in variants(kernels, B, H, dtype, dev, wide, x3=not tf32):
                fwd = lambda: kernels.rnn_forward(xp, w, h0, img, None, "tanh", form=form, config=cfg)  # noqa: E731
                bwd = lambda: kernels.rnn_backward(gy, ghl, out_ref, h0, w, None, "tanh", form=form, config=cfg)  # noqa: E731
                out = fwd()
                dA, dh0 = bwd()
                errs = {"out": rel(out, out64), "dA": rel(dA, dA64), "dh0": rel(dh0, dh064)}
                err = max(errs.values())
                ok = err <= tol
                failed += not ok
                fwd_ms, bwd_ms = time_ms(fwd), time_ms(bwd)
                programs = (triton.cdiv(B, cfg.block_b) if form == "persistent"
                            else kernels.rnn._grid(cfg, B, H, dev, form)[0])
                row = {"shape": [B, T, _I, _V, H], "dtype": dname, "form": form,
                       "config": None if cfg is None else cfg._asdict(), "programs": programs,
                       "forward_ms": fwd_ms, "backward_ms": bwd_ms, "forward_us_per_step": 1e3 * fwd_ms / T,
                       "backward_us_per_step": 1e3 * bwd_ms / T, "relative_error": err, "relative_errors": errs, "ok": ok,
                       "auto": kernels.choose_form(H, dtype) == form and cfg == kernels.default_config(B, H, dtype, dev, form)}
                rows.append(row)
                c = (f"b{cfg.block_b} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} p{programs}"
                     + (" exact-tanh" if cfg.fast_tanh is False else "") + (f" {cfg.fp32_dot}" if cfg.fp32_dot else ""))
                print(f"{B},{T},{H} {dname:8s} {form:11s} {c:24s} fwd {fwd_ms:7.3f} ms ({row['forward_us_per_step']:5.2f} us/step)"
                      f"  bwd {bwd_ms:7.3f} ms  err {err:.1e}{'' if ok else '  FAILED'}{'  [auto]' if row['auto'] else ''}",
                      flush=True)
    if args.part:
        return 0
    result = {"machine": machine_info(dev), "rows": rows,
              "seconds": time.time() - t_start}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}; {failed} variant(s) over tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
