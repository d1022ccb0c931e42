"""setup.py's per-platform compiler flags (compile_flags): x86-only flags only for an x86 target,
OpenMP only where the compiler builds an OpenMP probe, the switches honoured. The builds themselves
for aarch64 and clang without OpenMP are checked by scripts/check_platforms.sh (CI)."""
import importlib.util
import os

import pytest

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("mmrnn_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


def _flags(setup_py, monkeypatch, target, has_openmp, **kw):
    monkeypatch.setattr(setup_py, "_target", lambda cxx: target)
    monkeypatch.setattr(setup_py, "_accepts", lambda cxx, flags, source: has_openmp and flags == ["-fopenmp"])
    return setup_py.compile_flags(["c++"], **kw)


@pytest.mark.parametrize("target, native", [("x86_64-linux-gnu", True), ("x86_64-pc-linux-gnu", True),
                                            ("aarch64-linux-gnu", False), ("arm64-apple-darwin23.4.0", False)])
def test_native_flag_only_on_x86(setup_py, monkeypatch, target, native):
    compile_flags, _ = _flags(setup_py, monkeypatch, target, True)
    assert ("-march=native" in compile_flags) == native
    assert "-std=c++17" in compile_flags and "-O3" in compile_flags
    assert "-march=native" not in _flags(setup_py, monkeypatch, target, True, portable=True)[0]


@pytest.mark.parametrize("has_openmp", [True, False])
def test_openmp_only_where_the_compiler_has_it(setup_py, monkeypatch, has_openmp):
    compile_flags, link_flags = _flags(setup_py, monkeypatch, "arm64-apple-darwin23.4.0", has_openmp)
    assert ("-fopenmp" in compile_flags) == has_openmp and ("-fopenmp" in link_flags) == has_openmp
    compile_flags, link_flags = _flags(setup_py, monkeypatch, "x86_64-linux-gnu", has_openmp, openmp=False)
    assert "-fopenmp" not in compile_flags + link_flags


def test_debug_build(setup_py, monkeypatch):
    compile_flags, _ = _flags(setup_py, monkeypatch, "x86_64-linux-gnu", True, debug=True)
    assert compile_flags[:2] == ["-O0", "-g"] and "-O3" not in compile_flags


def _this_compiler():
    import shlex

    from torch.utils.cpp_extension import get_cxx_compiler

    return shlex.split(get_cxx_compiler())


def test_probes_this_compiler(setup_py):
    """The real probes on this machine's compiler: its target is this machine's architecture, a
    program that does not compile is refused."""
    import platform

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    target = setup_py._target(_this_compiler()).split("-")[0].replace("arm64", "aarch64")
    assert target == machine
    assert setup_py._accepts(_this_compiler(), [], "int main() { return 0; }\n")
    assert not setup_py._accepts(_this_compiler(), [], "int main() { return undeclared; }\n")


def test_this_build_uses_openmp_where_the_compiler_has_it(setup_py):
    """The installed extension runs on torch's threads exactly when its compiler builds OpenMP (GCC on
    Linux, as CI builds it; a default build: MMRNN_NO_OPENMP unset)."""
    require("cpp")
    from mmrnn_ext import _C

    assert _C.parallel_build() == setup_py._accepts(_this_compiler(), ["-fopenmp"], setup_py._OPENMP_PROBE)
    if os.environ.get("CI"):
        assert _C.parallel_build()  # CI's machine: GCC with OpenMP


def test_a_failed_build_ends_with_the_way_out(tmp_path):
    """When the compiler fails, the build's last line names the install without the extension."""
    import shutil
    import subprocess
    import sys

    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    env = dict(os.environ, CXX="false")  # a compiler that fails at once
    env.pop("MMRNN_NO_EXTENSION", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mmrnn_ext: the C++ extension did not build; MMRNN_NO_EXTENSION=1 pip install "
                           "--no-build-isolation . installs without it"), proc.stderr[-2000:]
