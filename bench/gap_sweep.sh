#!/usr/bin/env bash
# The README's long-gap sweep: rnn, lstm and gru (fusion add) at gaps 0-200 with the --quick budget
# and one seed, plus the text-only and image-only baselines; the machine's name heads the log and
# its wall time ends it. Run from the repository root in the dev environment.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results
RUN=$(mktemp -d)
start=$(date +%s)
{
  echo "machine: $($PY -c 'import torch; from mmrnn_ext.bench import machine_info as m; i = m(torch.device("cpu")); print(i["device"] + ",", i["cpu_cores"], "cores")')"
  $PY -m mmrnn_ext.train --quick --sweep-gaps 0,25,50,100,200 --cells rnn,lstm,gru --ablate --explain 0 \
      --out "$RUN" --json $OUT/gap_sweep_quick.json --plot $OUT/gap_sweep_quick.png
  echo "wall seconds: $(( $(date +%s) - start ))"
} 2>/dev/null | tee $OUT/gap_sweep_quick.txt
# The same without the curriculum (training on the target gap from the first epoch), at two gaps.
$PY -m mmrnn_ext.train --quick --sweep-gaps 25,100 --cells rnn,lstm,gru --no-curriculum --out "$RUN" \
    --json $OUT/gap_sweep_quick_nocurriculum.json 2>/dev/null | tail -6 | tee $OUT/gap_sweep_quick_nocurriculum.txt
# Across seeds, for the tanh RNN (whose single-seed curve is erratic): seeds 0, 1, 2 at every gap.
$PY -m mmrnn_ext.train --quick --sweep-gaps 0,25,50,100,200 --cells rnn --seeds 0,1,2 --out "$RUN" \
    --json $OUT/gap_sweep_quick_seeds.json --plot $OUT/gap_sweep_quick_seeds.png 2>/dev/null | tail -4 \
    | tee $OUT/gap_sweep_quick_seeds.txt
# The gated cells at gap 100 across seeds 0-4 (each >= 0.90 is the target).
$PY -m mmrnn_ext.train --quick --sweep-gaps 100 --cells lstm,gru --seeds 0,1,2,3,4 --out "$RUN" \
    --json $OUT/gap_sweep_quick_gap100_seeds.json 2>/dev/null | tail -4 | tee $OUT/gap_sweep_quick_gap100_seeds.txt
