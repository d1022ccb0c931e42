#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, no torch): sets up .venv, builds the C++
# extension against the torch installed there, then runs what was asked.
#   bash scripts/dev.sh example   the quick-start example (mmrnn_ext.RNN beside torch.nn.RNN)
#   bash scripts/dev.sh test      the whole test suite
#   bash scripts/dev.sh bench     the CPU benchmark (pytest-benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# No build isolation: the extension must be compiled against the torch it will run with.
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test,triton]"
case "${1:-}" in
  example) exec "$PY" examples/quickstart.py ;;
  test)    exec "$PY" -m pytest tests -q -p no:cacheprovider "${@:2}" ;;
  bench)   exec "$PY" -m pytest bench --benchmark-only "${@:2}" ;;
  *) echo "usage: bash scripts/dev.sh {example|test|bench} [extra pytest args]" >&2; exit 2 ;;
esac
