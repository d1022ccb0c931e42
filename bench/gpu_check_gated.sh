#!/usr/bin/env bash
# The GPU check of the LSTM and GRU Triton kernels, in one call on a lent H100/H200 (python3 with
# torch + triton, no network, no compiled extension: the package runs from the source tree).
# Writes under $OUT:
#   gpu_check_gated.log        the card and versions; the gated cells' GPU tests (fp32, tf32, bf16,
#                              fp16, forward and every gradient vs float64, both forms; the module
#                              and ecosystem tests of every cell); both benchmark tables per cell
#   bench_<cell>_default.json  mmrnn-bench --cell <cell> --all-backends: float32 (TF32 as PyTorch
#                              defaults), bfloat16, float16; providers nn.LSTM/GRU on the concatenated
#                              input (cuDNN; in bf16 whichever path the installed torch takes), the
#                              eager loop, mmrnn_ext (auto: the reference on CUDA until this check
#                              passes) and mmrnn_ext[triton] (the kernels)
#   bench_<cell>_tf32_off.json the same in float32 with TF32 off
# Usage (device tool): bash bench/gpu_check_gated.sh      (budget: under 9 minutes; unmeasured yet)
set -uo pipefail
LOG_NAME=gpu_check_gated.log
source "$(dirname "$0")/gpu_common.sh"
# the RNN's five GPU shapes and FlashRNN's published one (B,T,I,V,H)
SHAPES=(--shape 16,256,128,256,128 --shape 64,256,256,512,256 --shape 64,256,512,1024,512
        --shape 256,128,1024,2048,1024 --shape 1,1024,64,64,256 --shape 16,1024,768,768,768)
step "GPU tests (gated cells)"
run 150 python3 -m pytest tests/test_triton_gated.py tests/test_cells.py tests/test_gated_bad_input.py -m gpu -q \
  -p no:cacheprovider -rs -n "$JOBS"
grep -E "passed|failed|error" "$LOG" | tail -n 3
for CELL in lstm gru; do
  step "bench $CELL (TF32 default)"
  run 150 python3 -m mmrnn_ext.bench --cell $CELL --device cuda --dtype float32,bfloat16,float16 --all-backends \
    --no-compile "${SHAPES[@]}" --json "$OUT/bench_${CELL}_default.json"
  step "bench $CELL (TF32 off)"
  run 60 python3 -m mmrnn_ext.bench --cell $CELL --device cuda --dtype float32 --tf32 off --all-backends \
    --no-compile --no-recurrence "${SHAPES[@]}" --json "$OUT/bench_${CELL}_tf32_off.json"
done
step "done (status $status)"
exit $status
