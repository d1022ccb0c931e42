#!/usr/bin/env bash
# The README's "Deploying" table: every cell at the serving grid, mmrnn_ext and nn.X(concat) eager
# and exported to ONNX Runtime (inference), two separate runs each, then the README regenerated.
#   bash bench/cpu_onnx.sh            (about 10 minutes on a 2-core VM)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for run in 1 2; do
  for cell in rnn lstm gru; do
    $PY -m mmrnn_ext.bench --cell $cell --grid serving --stock-only --onnx --no-recurrence \
      --json bench/results/cpu_onnx_${cell}_run${run}.json > /dev/null
    echo "run $run $cell done"
  done
done
$PY bench/update_readme.py
