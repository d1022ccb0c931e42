#!/usr/bin/env bash
# The GPU check, in one call on a lent H100/H200 (python3 with torch + triton, no network, no
# compiled extension: the package runs from the source tree).
#
#   bash bench/gpu_check.sh [CELL ...]      CELL: rnn, lstm, gru (default: rnn)
#
# By its steps' time limits: the RNN at most 7 minutes (measured 6 on an H100, with its wider sweep),
# `lstm gru` together at most 9.5 minutes (budgeted, not yet measured): one call in a 15-minute
# device session. To leave room for a rerun, run one cell per call on the still-warm machine (it
# keeps Triton's compile cache).
# Writes under $OUT, per cell C with prefix P ("" for rnn, "lstm_" and "gru_" for the gated cells):
#   gpu_check.log          everything printed: the card, driver and versions; the sweeps' tables; the
#                          GPU tests (fp32, tf32, bf16, fp16; forward and every gradient vs fp64;
#                          cooperative-form repeatability; CUDA graphs; opcheck, compile, autocast,
#                          NCCL DDP); the benchmark tables; the targets summaries
#   Psweep.json            the kernels alone (bench/gpu_sweep.py --cell C): every form and a few tile
#                          configs per shape, forward and backward, each checked against float64 first;
#                          FLOPs, bytes and the floors they imply per step
#   Pbench_default.json    mmrnn-bench --cell C: float32 (TF32 as PyTorch defaults), bfloat16, float16;
#                          providers mmrnn_ext, nn.C on the concatenated input (cuDNN; in bfloat16 the
#                          path the installed torch takes, named in the JSON), the eager loop
#   Pbench_tf32_off.json   the same in float32 with TF32 off
#   Pbench.png             the speedup plot;   Psummary.txt   the issue's targets, measured
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CELLS=("${@:-rnn}")
for c in "${CELLS[@]}"; do
  case $c in rnn|lstm|gru) ;; *) echo "gpu_check.sh: CELL must be rnn, lstm or gru, got '$c'" >&2; exit 2 ;; esac
done
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
JOBS=${JOBS:-8}
LOG="$OUT/gpu_check.log"
: > "$LOG"
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$LOG"; }
run() {  # run LIMIT_S CMD...: output appended to the log; a failure or timeout marks the check failed
  local limit=$1; shift
  timeout "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { status=1; echo "!! exit $rc: $*" | tee -a "$LOG"; }
}
step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())" >> "$LOG" 2>&1

# the RNN's five GPU shapes and FlashRNN's published one (B,T,I,V,H), for the gated cells
GATED_SHAPES=(--shape 16,256,128,256,128 --shape 64,256,256,512,256 --shape 64,256,512,1024,512
              --shape 256,128,1024,2048,1024 --shape 1,1024,64,64,256 --shape 16,1024,768,768,768)
TESTS_RNN=(tests/test_triton.py tests/test_ecosystem.py tests/test_cells.py tests/test_higher_order.py)
TESTS_GATED=(tests/test_triton_gated.py tests/test_ecosystem.py tests/test_gated_bad_input.py tests/test_higher_order.py)
TESTS=(); K=()
case " ${CELLS[*]} " in
  *" rnn "*) TESTS+=("${TESTS_RNN[@]}") ;;&
  *" lstm "*|*" gru "*) TESTS+=("${TESTS_GATED[@]}") ;;
esac
WANT="${CELLS[*]}"
[ "$WANT" = rnn ] && K=(-k "not lstm and not gru")
[[ " $WANT " != *" rnn "* ]] && K=(-k "$(echo "$WANT" | sed 's/ / or /g')")
step "GPU tests (${CELLS[*]})"
run 150 python3 -m pytest $(printf '%s\n' "${TESTS[@]}" | sort -u) -m gpu "${K[@]}" -q -p no:cacheprovider -rs -n "$JOBS"
grep -E "passed|failed|error" "$LOG" | tail -n 3
for CELL in "${CELLS[@]}"; do
  if [ "$CELL" = rnn ]; then P=""; SHAPES=(); SWEEP_S=150; SWEEP_BUDGET=100
  else P="${CELL}_"; SHAPES=("${GATED_SHAPES[@]}"); SWEEP_S=90; SWEEP_BUDGET=40; fi
  step "$CELL: kernel sweep"
  run $SWEEP_S python3 -W ignore bench/gpu_sweep.py "$OUT/${P}sweep.json" --cell "$CELL" --jobs "$JOBS" \
    --budget $SWEEP_BUDGET "${SHAPES[@]}"
  grep -E "\[auto\]|FAILED" "$LOG" | tail -n 25
  step "$CELL: bench (TF32 default)"
  run 80 python3 -m mmrnn_ext.bench --cell "$CELL" --device cuda --dtype float32,bfloat16,float16 --no-compile \
    "${SHAPES[@]}" --json "$OUT/${P}bench_default.json" --plot "$OUT/${P}bench.png"
  step "$CELL: bench (TF32 off)"
  run 40 python3 -m mmrnn_ext.bench --cell "$CELL" --device cuda --dtype float32 --tf32 off --no-recurrence \
    --no-compile "${SHAPES[@]}" --json "$OUT/${P}bench_tf32_off.json"
  step "$CELL: summary"
  python3 bench/gpu_summary.py "$OUT" "$P" 2>&1 | tee "$OUT/${P}summary.txt" | tee -a "$LOG"
done
step "done (status $status)"
exit $status
