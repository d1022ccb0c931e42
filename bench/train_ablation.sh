#!/usr/bin/env bash
# The README's training table: every fusion mode and baseline, --quick budget, ten seeds (mean and
# minimum), with attribution plots; the machine's name heads the log. Run from the repository root
# in the dev environment (bash scripts/dev.sh test builds it).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results
RUN=$(mktemp -d)
{
  echo "machine: $($PY -c 'import torch; from mmrnn_ext.bench import machine_info as m; i = m(torch.device("cpu")); print(i["device"] + ",", i["cpu_cores"], "cores")')"
  $PY -m mmrnn_ext.train --quick --ablate --cell rnn --seeds 0,1,2,3,4,5,6,7,8,9 --explain 3 --out "$RUN" --json $OUT/train_quick_ablate.json
} 2>/dev/null | tee $OUT/train_quick_ablate.txt
cp "$RUN/curves_seed4.png" $OUT/train_curves_add.png
cp "$RUN/confusion_seed4.png" $OUT/train_confusion_add.png
cp "$(ls "$RUN"/explain_*.png | head -1)" $OUT/train_explain_example.png
# The LSTM and GRU columns: the same ablation on the gated cells (accuracy; no plots kept).
for CELL in lstm gru; do
  $PY -m mmrnn_ext.train --quick --ablate --cell $CELL --seeds 0,1,2,3,4,5,6,7,8,9 --out "$RUN/$CELL" \
      --json $OUT/train_quick_ablate_$CELL.json 2>/dev/null | tail -8 | tee $OUT/train_quick_ablate_$CELL.txt
done
