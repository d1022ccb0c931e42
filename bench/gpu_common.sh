# Shared by the one-call GPU checks (gpu_check.sh, gpu_check_gated.sh): sourced after the caller
# sets LOG_NAME. Moves to the repository root, prepares $OUT and the log, defines step / run, and
# writes the card, driver and versions first.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
JOBS=${JOBS:-8}
LOG="$OUT/$LOG_NAME"
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
