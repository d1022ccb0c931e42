#!/usr/bin/env bash
# The GPU check, in one call on a lent H100/H200 (python3 with torch + triton, no network, no
# compiled extension: the package runs from the source tree). Writes under $OUT:
#   gpu.txt               the card, driver, torch/triton/cuDNN versions
#   gpu_tests.log         the GPU tests (fp32, tf32, bf16, fp16; forward and every gradient vs fp64;
#                         opcheck, compile, autocast and NCCL DDP on CUDA)
#   bench_default.json    mmrnn-bench, float32 (TF32 as PyTorch defaults), bfloat16, float16
#   bench_tf32_off.json   mmrnn-bench, float32 with TF32 off
#   bench.png             the speedup plot;  summary.txt   the issue's targets, measured
# Usage (device tool): bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
status=0
timeout 300 python3 -m pytest tests/test_triton.py tests/test_ecosystem.py -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 360 python3 -m mmrnn_ext.bench --device cuda --dtype float32,bfloat16,float16 \
  --json "$OUT/bench_default.json" --plot "$OUT/bench.png" 2>/dev/null | tee "$OUT/bench_default.txt" | tail -n 40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 180 python3 -m mmrnn_ext.bench --device cuda --dtype float32 --tf32 off --no-recurrence \
  --json "$OUT/bench_tf32_off.json" 2>/dev/null > "$OUT/bench_tf32_off.txt"
[ "$?" -eq 0 ] || status=1
python3 bench/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
exit $status
