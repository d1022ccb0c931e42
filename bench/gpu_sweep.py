"""The Triton kernels alone on a GPU: every form and a few tile configs per shape, forward and
backward, each checked against the float64 reference at the benchmark shape before it is timed.

    python3 bench/gpu_sweep.py OUT.json [--quick] [--cell rnn|lstm|gru]

It is how the size rule in kernels/launch.py (choose_form, default_config) was chosen: the rows name
form, tiles, warps, programs, median ms (triton.testing.do_bench) and microseconds per step.
Each row also counts one step's work: the recurrent dot's FLOPs ([B, H] x [H, G*H], G gates) and the
bytes a step must move at the least (its projected input and per-step outputs; W_hh read once), and
the floors they imply at the H100's measured peaks (PEAK_TFLOPS, HBM_TBPS: shared/GPU_NOTES.md).
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

from mmrnn_ext import _backends, reference  # noqa: E402
from mmrnn_ext.bench import GPU_GRID, QUICK_GPU_GRID, machine_info  # noqa: E402

# float32 runs with TF32 as torch has it by default (allowed); "float32-notf32" with TF32 off
DTYPES = {"bfloat16": (torch.bfloat16, 1e-2), "float16": (torch.float16, 1e-2), "float32": (torch.float32, 5e-4),
          "float32-notf32": (torch.float32, 1e-5)}


GATES = {"rnn": 1, "lstm": 4, "gru": 3}
# measured on an H100 (shared/GPU_NOTES.md): bf16 dense matrix product, device-to-device copy.
# TF32 runs the tensor cores at half the 16-bit rate; float32 without TF32 is taken at tf32x3's third.
PEAK_TFLOPS = {"bfloat16": 798.0, "float16": 798.0, "float32": 399.0, "float32-notf32": 133.0}
HBM_TBPS = 3.0


def step_cost(cell, B, H, dtype):
    """(FLOPs, bytes) of one forward step at the least: the recurrent dot; reading xp_t and writing what the
    step saves (RNN: h; LSTM: h, c and 4 gates; GRU: h and 4 gates) once, W_hh once per sequence (not counted)."""
    G = GATES[cell]
    e = torch.tensor([], dtype=dtype).element_size()
    saved = {"rnn": 1, "lstm": 6, "gru": 5}[cell]
    return 2.0 * B * H * G * H, e * B * H * (G + saved)


def variants(kernels, B, H, dtype, device, wide, x3=False, cell="rnn"):
    """(form, Config) pairs to try at this size; wide: more tile configs, and the exact tanh (the RNN's:
    the gated cells use the exact tanh throughout); x3: float32 with TF32 off also through the FMA dot
    ("ieee"; the default splits by size)."""
    out = []
    gated = cell != "rnn"
    if kernels.persistent_fits(H, dtype, GATES[cell]):
        pbase = kernels.default_config(B, H, dtype, device, "persistent")
        out.append(("persistent", pbase))
        if wide:
            out += [("persistent", pbase._replace(num_warps=8))]
            out += [] if gated else [("persistent", pbase._replace(fast_tanh=False))]
        if x3 and not gated:  # the gated persistent forward has no "ieee" (kernels/launch.py plan)
            out.append(("persistent", pbase._replace(fp32_dot="ieee")))
    base = kernels.default_config(B, H, dtype, device, "cooperative")
    tries = [base] + ([base._replace(fp32_dot="ieee")] if x3 else [])
    if wide:
        tries += [base._replace(block_n=base.block_n * 2), base._replace(block_b=max(16, base.block_b // 2)),
                  base._replace(block_k=max(16, base.block_k // 2))] + ([] if gated else [base._replace(fast_tanh=False)])
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


class Problem:
    """One cell at one size and dtype: inputs drawn in float64 and rounded to the dtype, the kernels'
    forward and backward for a (form, config), and the float64 reference on the same rounded inputs
    (the backward's reference reads the forward's saved tensors as the dtype stores them)."""

    def __init__(self, kernels, cell, B, T, H, dtype, dev):
        self.k, self.cell = kernels, cell
        G = GATES[cell] * H
        g = torch.Generator().manual_seed(0)
        r = lambda *size, scale=1.0: (scale * torch.randn(*size, generator=g, dtype=torch.float64)).to(dev, dtype)  # noqa: E731
        self.xp, self.w, self.h0, self.c0 = r(T, B, G), r(G, H, scale=H ** -0.5), r(B, H, scale=0.5), r(B, H, scale=0.5)
        self.img, self.bhn, self.gy = r(B, G), r(H, scale=0.1), r(T, B, H)
        self.ghl, self.gcl = r(B, H), r(B, H)
        wide = lambda ts: [t.double() for t in ts]  # noqa: E731
        self.saved64 = self._ref_forward(*wide(self._fwd_inputs()))
        self.saved = [t.to(dtype) for t in self.saved64]  # what the forward stores, for the backward
        self.grads64 = self._ref_backward(*wide(self._bwd_inputs(self.saved)))

    def _fwd_inputs(self):
        return {"rnn": (self.xp, self.w, self.h0, self.img), "lstm": (self.xp, self.w, self.h0, self.c0, self.img),
                "gru": (self.xp, self.w, self.bhn, self.h0, self.img)}[self.cell]

    def _bwd_inputs(self, saved):
        if self.cell == "rnn":
            return self.gy, self.ghl, saved[0], self.h0, self.w
        if self.cell == "lstm":
            return self.gy, self.ghl, self.gcl, *saved, self.h0, self.c0, self.w
        return self.gy, self.ghl, *saved, self.h0, self.w

    def _ref_forward(self, *a):
        if self.cell == "rnn":
            return (reference.reference_forward(*a, None, "tanh"),)
        return {"lstm": reference.lstm_reference_forward, "gru": reference.gru_reference_forward}[self.cell](*a, None)

    def _ref_backward(self, *a):
        if self.cell == "rnn":
            return reference.reference_backward(*a, None, "tanh")
        return {"lstm": reference.lstm_reference_backward, "gru": reference.gru_reference_backward}[self.cell](*a, None)

    def forward(self, form, cfg):
        k, a = self.k, self._fwd_inputs()
        if self.cell == "rnn":
            return (k.rnn_forward(*a, None, "tanh", form=form, config=cfg),)
        return {"lstm": k.lstm_forward, "gru": k.gru_forward}[self.cell](*a, None, form=form, config=cfg)

    def backward(self, form, cfg):
        k, a = self.k, self._bwd_inputs(self.saved)
        if self.cell == "rnn":
            return k.rnn_backward(*a, None, "tanh", form=form, config=cfg)
        return {"lstm": k.lstm_backward, "gru": k.gru_backward}[self.cell](*a, None, form=form, config=cfg)

    def errors(self, outs, grads) -> dict:
        errs = {f"out{i}": rel(o, o64) for i, (o, o64) in enumerate(zip(outs, self.saved64))}
        errs.update({f"grad{i}": rel(d, d64) for i, (d, d64) in enumerate(zip(grads, self.grads64))})
        return errs


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="bfloat16,float16,float32,float32-notf32",
                   help="comma-separated; only bfloat16 tries the wider set of tile configs")
    p.add_argument("--shape", action="append", metavar="B,T,I,V,H", help="instead of the GPU grid (repeatable)")
    p.add_argument("--cell", choices=list(GATES), default="rnn")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="start no new shape/dtype after this many seconds (the JSON says where it stopped)")
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
    cell = args.cell

    stopped = []

    def write():  # after every shape and dtype too: a run stopped by its time limit keeps what it measured
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(dev), "cell": cell, "rows": rows, "seconds": time.time() - t_start,
                       "not_run_for_budget": stopped}, f, indent=1)

    for (B, T, _I, _V, H) in shapes:
        for dname in args.dtype.split(","):
            if args.budget is not None and not args.part and time.time() - t_start > args.budget:
                stopped.append({"shape": [B, T, _I, _V, H], "dtype": dname})
                print(f"{cell} {B},{T},{H} {dname}: not run (--budget {args.budget:g} s spent)", flush=True)
                continue
            dtype, tol = DTYPES[dname]
            tf32 = dname != "float32-notf32"
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            wide = dtype == torch.bfloat16
            tries = variants(kernels, B, H, dtype, dev, wide, x3=not tf32, cell=cell)
            if args.part:  # a compile worker: run each of its variants once
                prob = None
                for form, cfg in tries:
                    index += 1
                    if index % parts == part:
                        prob = prob or Problem(kernels, cell, B, T, H, dtype, dev)
                        prob.forward(form, cfg)
                        prob.backward(form, cfg)
                continue
            prob = Problem(kernels, cell, B, T, H, dtype, dev)
            flop, nbytes = step_cost(cell, B, H, dtype)
            floor_us = {"flop": flop / (PEAK_TFLOPS[dname] * 1e6), "byte": nbytes / (HBM_TBPS * 1e6)}
            for form, cfg in tries:
                fwd = lambda: prob.forward(form, cfg)  # noqa: E731
                bwd = lambda: prob.backward(form, cfg)  # noqa: E731
                errs = prob.errors(fwd(), bwd())
                err = max(errs.values())
                ok = err <= tol
                failed += not ok
                fwd_ms, bwd_ms = time_ms(fwd), time_ms(bwd)
                programs = (triton.cdiv(B, cfg.block_b) if form == "persistent"
                            else kernels.launch._grid(cfg, B, H, dev, form)[0])
                auto = (kernels.choose_form(H, dtype, None, GATES[cell]) == form
                        and cfg == kernels.default_config(B, H, dtype, dev, form))
                row = {"cell": cell, "shape": [B, T, _I, _V, H], "dtype": dname, "form": form,
                       "config": None if cfg is None else cfg._asdict(), "programs": programs,
                       "forward_ms": fwd_ms, "backward_ms": bwd_ms, "forward_us_per_step": 1e3 * fwd_ms / T,
                       "backward_us_per_step": 1e3 * bwd_ms / T, "step_flop": flop, "step_bytes": nbytes,
                       "floor_us_per_step": floor_us, "relative_error": err, "relative_errors": errs, "ok": ok,
                       "auto": auto}
                rows.append(row)
                c = (f"b{cfg.block_b} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} p{programs}"
                     + (" exact-tanh" if cfg.fast_tanh is False else "") + (f" {cfg.fp32_dot}" if cfg.fp32_dot else ""))
                print(f"{cell} {B},{T},{H} {dname:8s} {form:11s} {c:24s} fwd {fwd_ms:7.3f} ms ({row['forward_us_per_step']:5.2f} us/step;"
                      f" floor {max(floor_us.values()):.2f})  bwd {bwd_ms:7.3f} ms  err {err:.1e}"
                      f"{'' if ok else '  FAILED'}{'  [auto]' if auto else ''}", flush=True)
            write()
    if args.part:
        return 0
    write()
    print(f"wrote {args.json}; {failed} variant(s) over tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
