#!/usr/bin/env bash
# The builds this x86 Linux machine can check for platforms it is not (CI runs it; it fails on any error):
#   1. aarch64 Linux: every csrc/*.cpp compiled by Debian's cross compiler (aarch64-linux-gnu-g++) with
#      the flags setup.py chooses for that target, against the installed torch's headers (compiled,
#      not linked: there is no aarch64 libtorch here).
#   2. the same with clang for aarch64 without OpenMP (the nearest to Apple's clang on arm64 here).
#   3. clang without OpenMP (what Apple's clang is): the whole extension built by clang++ with the
#      portable flags (MMRNN_PORTABLE=1 MMRNN_NO_OPENMP=1) in a copy of the tree, then the engine's
#      tests run on that build (tests/test_cpu_engine.py: every vector path this CPU has against the
#      plain-PyTorch reference, forward and gradients; tests/test_cell_train.py: the cells' steps).
# Usage: bash scripts/check_platforms.sh   (after scripts/dev.sh has set up .venv; installs the two
# compilers with apt-get when they are missing and it may)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v clang++ >/dev/null || need+=(clang)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -q "${need[@]}" >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${need[@]}" >/dev/null; }
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# the flags setup.py chooses for a compiler, and the headers every csrc file needs
flags() {
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("mmrnn_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
cxx, portable = sys.argv[1].split(), sys.argv[2] == "1"
print(" ".join(setup.compile_flags(cxx, portable=portable)[0]))
EOF
}
INCLUDES=$("$PY" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")
DEFINES="-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -fPIC"

# compile every csrc file with a compiler and flags, in parallel; fail on any error
compile_all() {
  local label=$1 tag=$2; shift 2
  local pids=() fail=0 i=0 f
  for f in csrc/*.cpp; do
    "$@" $DEFINES $INCLUDES -c "$f" -o "$WORK/$(basename "$f").$tag.o" 2>"$WORK/$(basename "$f").$tag.log" &
    pids+=($!)
  done
  for f in csrc/*.cpp; do
    if wait "${pids[$i]}"; then
      echo "   ok   $f"
    else
      echo "   FAIL $f" >&2
      grep -E "error" "$WORK/$(basename "$f").$tag.log" | head -20 >&2
      fail=1
    fi
    i=$((i + 1))
  done
  [ $fail -eq 0 ] || { echo "FAILED: csrc does not compile for $label" >&2; exit 1; }
  file "$WORK/cell_step.cpp.$tag.o" | grep -q "ARM aarch64" || { echo "FAILED: not an aarch64 object ($label)" >&2; exit 1; }
}

echo "== aarch64 Linux, GCC: $(aarch64-linux-gnu-g++ --version | head -1)"
AFLAGS=$(flags aarch64-linux-gnu-g++ 0)
echo "   setup.py's flags for it: $AFLAGS"
case "$AFLAGS" in *-march=native*) echo "FAILED: setup.py gives -march=native to an aarch64 compiler" >&2; exit 1 ;; esac
compile_all "aarch64 (GCC)" gcc-aarch64 aarch64-linux-gnu-g++ $AFLAGS

# the nearest this machine has to Apple's clang on arm64: clang for aarch64, no OpenMP
echo "== aarch64, clang, no OpenMP: $(clang++ --version | head -1)"
CFLAGS_ARM=$(flags "clang++ --target=aarch64-linux-gnu" 0 | sed 's/ -fopenmp//')
echo "   flags: $CFLAGS_ARM"
compile_all "aarch64 (clang)" clang-aarch64 clang++ --target=aarch64-linux-gnu $CFLAGS_ARM

echo "== clang, portable, no OpenMP: $(clang++ --version | head -1)"
mkdir -p "$WORK/tree"
tar --exclude=.venv --exclude=.git --exclude=build --exclude='*.so' -cf - . | tar -xf - -C "$WORK/tree"
(cd "$WORK/tree" && CXX=clang++ MMRNN_PORTABLE=1 MMRNN_NO_OPENMP=1 MAX_JOBS=${MAX_JOBS:-2} \
   "$PY" setup.py -q build_ext --inplace >"$WORK/clang.log" 2>&1) || {
  grep -E "error" "$WORK/clang.log" | head -20 >&2
  echo "FAILED: the clang build (log above)" >&2
  exit 1
}
grep -q "clang++" "$WORK/tree/build"/*/build.ninja 2>/dev/null || grep -rq "clang++" "$WORK/tree/build" || {
  echo "FAILED: the build did not use clang++" >&2
  exit 1
}
cd "$WORK/tree"
PYTHONPATH="$WORK/tree" "$PY" -c "
import mmrnn_ext, mmrnn_ext._C as C
assert mmrnn_ext._C.__file__.startswith('$WORK/tree'), mmrnn_ext._C.__file__
assert not C.parallel_build(), 'built without OpenMP, yet it reports a parallel build'
print('   the clang build: ' + mmrnn_ext.backends()['cpp']['detail'])"
PYTHONPATH="$WORK/tree" MMRNN_REQUIRE=cpp "$PY" -m pytest tests/test_cpu_engine.py tests/test_cell_train.py -q -x \
  -p no:cacheprovider | tail -3
cd "$ROOT"
echo "== platform checks passed"
