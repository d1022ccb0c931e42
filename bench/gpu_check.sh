#!/usr/bin/env bash
# The GPU check, in one call on a lent H100/H200 (python3 with torch + triton, no network, no
# compiled extension: the package runs from the source tree). Writes under $OUT (six files):
#   gpu_check.log         everything printed: the card, driver and versions; the kernel sweep's table;
#                         the GPU tests (fp32, tf32, bf16, fp16; forward and every gradient vs fp64;
#                         cooperative-form repeatability; CUDA graphs; opcheck, compile, autocast, NCCL
#                         DDP); both benchmark tables; the targets summary
#   sweep.json            the kernels alone: every form and a few tile configs per benchmark shape,
#                         forward and backward, each checked against float64 first (bench/gpu_sweep.py)
#   bench_default.json    mmrnn-bench, float32 (TF32 as PyTorch defaults), bfloat16, float16
#   bench_tf32_off.json   mmrnn-bench, float32 with TF32 off
#   bench.png             the speedup plot;   summary.txt   the issue's targets, measured
# Usage (device tool): bash bench/gpu_check.sh      (about 6 minutes on an H100)
set -uo pipefail
LOG_NAME=gpu_check.log
source "$(dirname "$0")/gpu_common.sh"
step "kernel sweep"
run 150 python3 -W ignore bench/gpu_sweep.py "$OUT/sweep.json" --jobs "$JOBS"
grep -E "\[auto\]|FAILED" "$LOG" | tail -n 25
step "GPU tests"
run 170 python3 -m pytest tests/test_triton.py tests/test_ecosystem.py tests/test_cells.py tests/test_higher_order.py -m gpu -q -p no:cacheprovider -rs -n "$JOBS"
grep -E "passed|failed|error" "$LOG" | tail -n 3
step "bench (TF32 default)"
run 190 python3 -m mmrnn_ext.bench --device cuda --dtype float32,bfloat16,float16 \
  --json "$OUT/bench_default.json" --plot "$OUT/bench.png"
step "bench (TF32 off)"
run 70 python3 -m mmrnn_ext.bench --device cuda --dtype float32 --tf32 off --no-recurrence \
  --json "$OUT/bench_tf32_off.json"
step "summary"
python3 bench/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
step "done (status $status)"
exit $status
