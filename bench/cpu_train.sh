#!/usr/bin/env bash
# The CPU training measurements behind the README's training columns and issue 33's figures: three
# separate runs (run 1 of every case, then run 2, then run 3, so that a slow spell of a shared
# machine is spread over all of them) of
#   the LSTM at the serving grid, the 2-layer bidirectional LSTM (16,200,80,64,256) and hidden 768
#   (64,50,512,64,768); the RNN and GRU at the serving grid; off those, the LSTM at (4,96,200,32,384)
#   and (48,64,64,16,192) and a 2-layer bidirectional GRU (12,80,40,24,160)
# each against torch's own module (oneDNN), inference and a training step side by side in one process,
# with the machine's big-GEMM ceiling; bench/train_summary.py then prints mean and minimum per shape.
#   bash bench/cpu_train.sh            (about 40 minutes on the 2-core Zen 1 VM, 15 on the Zen 4)
#   OUT=bench/results/train_zen4 bash bench/cpu_train.sh    (another folder: another CPU's runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/train}
mkdir -p $OUT
for run in 1 2 3; do
  $PY -m mmrnn_ext.bench --cell lstm --grid serving --stock-only --json $OUT/lstm_serving_run${run}.json > /dev/null
  $PY -m mmrnn_ext.bench --cell lstm --layers 2 --bidirectional --shape 16,200,80,64,256 --stock-only \
    --no-recurrence --json $OUT/lstm_bidir2_run${run}.json > /dev/null
  $PY -m mmrnn_ext.bench --cell lstm --shape 64,50,512,64,768 --stock-only --no-recurrence \
    --json $OUT/lstm_h768_run${run}.json > /dev/null
  $PY -m mmrnn_ext.bench --cell lstm --shape 4,96,200,32,384 --shape 48,64,64,16,192 --stock-only --no-recurrence \
    --json $OUT/lstm_offgrid_run${run}.json > /dev/null
  $PY -m mmrnn_ext.bench --cell gru --layers 2 --bidirectional --shape 12,80,40,24,160 --stock-only --no-recurrence \
    --json $OUT/gru_bidir2_offgrid_run${run}.json > /dev/null
  for cell in rnn gru; do
    $PY -m mmrnn_ext.bench --cell $cell --grid serving --stock-only --no-recurrence \
      --json $OUT/${cell}_serving_run${run}.json > /dev/null
  done
  echo "run $run done"
done
$PY bench/train_summary.py $OUT
