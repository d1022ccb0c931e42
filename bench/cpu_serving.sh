#!/usr/bin/env bash
# The CPU serving measurements behind the README's serving, bfloat16 and decoding tables: three
# separate runs of each (run 1 of every kind, then run 2, then run 3, so that a slow spell of a
# shared machine is spread over all of them), then the README regenerated from the JSON.
#   bash bench/cpu_serving.sh            (about 20 minutes on a 2-core VM)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for run in 1 2 3; do
  for cell in rnn lstm gru; do
    $PY -m mmrnn_ext.bench --cell $cell --grid serving --stock-only \
      --json bench/results/cpu_serving_${cell}_run${run}.json > /dev/null
    $PY -m mmrnn_ext.bench --cell $cell --grid serving --stock-only --autocast bfloat16 \
      --json bench/results/cpu_serving_bf16_${cell}_run${run}.json > /dev/null
    $PY -m mmrnn_ext.bench --cell $cell --decode --json bench/results/cpu_decode_${cell}_run${run}.json > /dev/null
    echo "run $run $cell done"
  done
done
$PY bench/update_readme.py
