#!/usr/bin/env bash
# The C++ extension built for Linux aarch64 and its tests run under emulation (qemu-user), on this
# x86 machine. Not part of CI (about 20 minutes on 2 cores, most of it emulation); run by hand:
#   bash scripts/emulate_aarch64.sh [pytest args]      (default: the engine's, the cells' and the
#                                                        cpp backend's tests)
# What it sets up, under $WORK (default /tmp/mmrnn_aarch64, kept between runs):
#   root/   Debian bookworm's arm64 python3.11 and libgomp (debootstrap --foreign, unpacked, not
#           configured: qemu-aarch64-static -L root runs its binaries)
#   site/   torch's aarch64 wheel from PyPI (TORCH_AARCH64, default 2.7.1: the newest whose aarch64
#           wheel is CPU-only; later ones require NVIDIA's CUDA libraries) and the test requirements
#   tree/   a copy of this tree with mmrnn_ext/_C built by Debian's aarch64 cross compiler with the
#           flags setup.py gives that target, linked against that torch
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${WORK:-/tmp/mmrnn_aarch64}
TORCH_AARCH64=${TORCH_AARCH64:-2.7.1}
mkdir -p "$WORK"

need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -q "${need[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
fi

if [ ! -x "$WORK/root/usr/bin/python3.11" ]; then
  echo "== arm64 root (debootstrap --foreign)"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3.11,libgomp1 bookworm "$WORK/root" >"$WORK/debootstrap.log"
  for deb in "$WORK"/root/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$WORK/root"; done
fi
RUN=(qemu-aarch64-static -L "$WORK/root" "$WORK/root/usr/bin/python3.11")

if [ ! -d "$WORK/site/torch" ]; then
  echo "== torch $TORCH_AARCH64 for aarch64 and the test requirements"
  pip_arm=("$PY" -m pip install -q --disable-pip-version-check --target "$WORK/site" --platform manylinux_2_28_aarch64
           --platform manylinux2014_aarch64 --only-binary=:all: --python-version 3.11)
  "${pip_arm[@]}" --no-deps "torch==$TORCH_AARCH64"
  "${pip_arm[@]}" filelock typing_extensions sympy networkx jinja2 fsspec numpy pytest
fi

echo "== the extension for aarch64 (cross compiled, linked against torch $TORCH_AARCH64)"
rm -rf "$WORK/tree" && mkdir -p "$WORK/tree/obj"
tar --exclude=.venv --exclude=.git --exclude=build --exclude='*.so' -cf - . | tar -xf - -C "$WORK/tree"
T="$WORK/site/torch"
# pybind11's ABI tags and the C++ ABI must be those torch was built with (BuildExtension's rule)
ABI=$(PYTHONPATH="$WORK/site" "${RUN[@]}" -c "import torch; c = torch._C
print(c._PYBIND11_COMPILER_TYPE, c._PYBIND11_STDLIB, c._PYBIND11_BUILD_ABI, int(c._GLIBCXX_USE_CXX11_ABI))" 2>/dev/null)
read -r COMPILER_TYPE STDLIB BUILD_ABI CXX11_ABI <<<"$ABI"
FLAGS=$("$PY" - <<'EOF'
import importlib.util
spec = importlib.util.spec_from_file_location("mmrnn_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
print(" ".join(setup.compile_flags(["aarch64-linux-gnu-g++"])[0]))
EOF
)
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pids=()
for f in csrc/*.cpp; do
  aarch64-linux-gnu-g++ $FLAGS -fPIC -I"$T/include" -I"$T/include/torch/csrc/api/include" -I"$PYINC" \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -DPYBIND11_COMPILER_TYPE="\"$COMPILER_TYPE\"" \
    -DPYBIND11_STDLIB="\"$STDLIB\"" -DPYBIND11_BUILD_ABI="\"$BUILD_ABI\"" -D_GLIBCXX_USE_CXX11_ABI="$CXX11_ABI" \
    -c "$f" -o "$WORK/tree/obj/$(basename "$f" .cpp).o" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
aarch64-linux-gnu-g++ -shared -fopenmp -o "$WORK/tree/mmrnn_ext/_C.cpython-311-aarch64-linux-gnu.so" "$WORK"/tree/obj/*.o \
  -L"$T/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python

echo "== the tests under qemu-aarch64"
cd "$WORK/tree"
PYTHONPATH="$WORK/site:$WORK/tree" "${RUN[@]}" -c "
import mmrnn_ext, mmrnn_ext._C as C, platform
assert platform.machine() == 'aarch64' and C.__file__.startswith('$WORK/tree'), C.__file__
print('   ' + mmrnn_ext.backends()['cpp']['detail'])" 2>&1 | grep -v MIDR_EL1
if [ $# -eq 0 ]; then
  # (not the example test: it starts sys.executable, which only qemu can run, as a subprocess)
  set -- tests/test_cpu_engine.py tests/test_cell_train.py tests/test_cpp_backend.py -k "not example_runs"
fi
PYTHONPATH="$WORK/site:$WORK/tree" MMRNN_REQUIRE=cpp "${RUN[@]}" -m pytest -q -p no:cacheprovider "$@" 2>&1 | grep -v MIDR_EL1
