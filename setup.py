"""Builds mmrnn_ext, with its C++ CPU backend (csrc/) compiled against the installed torch.

Install without build isolation, so the extension is compiled against the torch it will run with:

    pip install --no-build-isolation .

Environment switches:
    MMRNN_NO_EXTENSION=1   skip the C++ build (the package then runs on its Triton/reference backends)
    MMRNN_PORTABLE=1       compile without -march=native (for a wheel that runs on other CPUs; the
                           only build off x86, where the engine runs its 128-bit path: NEON on aarch64)
    MMRNN_NO_OPENMP=1      compile without OpenMP even where the compiler has it (every call then runs
                           on one thread, with the same results; what Apple's clang builds anyway)
    MMRNN_DEBUG=1          compile with -O0 -g
"""
import os
import shlex
import subprocess
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_BUILD_HELP = ("mmrnn_ext: the C++ extension did not build; MMRNN_NO_EXTENSION=1 pip install --no-build-isolation . "
               "installs without it (everything still runs, on the plain-PyTorch 'reference' path on CPU: correct, "
               "several times slower; CUDA tensors keep their Triton kernels)")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _target(cxx: list) -> str:
    """The compiler's target triple (x86_64-linux-gnu, aarch64-linux-gnu, arm64-apple-darwin...): what
    the flags are chosen for, so that a cross compiler gets its target's flags, not the build machine's."""
    try:
        return subprocess.run(cxx + ["-dumpmachine"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        import platform

        return platform.machine()


def _accepts(cxx: list, flags: list, source: str) -> bool:
    """Whether the compiler builds and links `source` with `flags` (probing an optional feature)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            return subprocess.run(cxx + flags + [src, "-o", os.path.join(tmp, "probe")], capture_output=True).returncode == 0
        except OSError:
            return False


_OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compile_flags(cxx: list, portable: bool = False, debug: bool = False, openmp: bool = True) -> tuple[list, list]:
    """(compile flags, link flags) for the C++ extension with the compiler `cxx`, per its target:
    -march=native only on x86 (and not with MMRNN_PORTABLE=1); elsewhere (aarch64 Linux, macOS
    arm64) the portable build (the engine's 128-bit path, NEON on aarch64); OpenMP only where the
    compiler has it (GCC, clang with libomp; not Apple's clang): without it the extension runs every
    call on one thread, with the same results."""
    x86 = _target(cxx).split("-")[0] in ("x86_64", "amd64", "i386", "i686")
    if debug:
        flags = ["-O0", "-g"]
    else:
        # -O3 vectorises the per-step elementwise pass; without trapping math GCC may if-convert
        # the selects in tanh_f32 (it refuses otherwise: "control flow in loop"), as torch's own
        # build does. -march=native lets it use the build machine's widest SIMD (the package is
        # compiled where it is installed).
        flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + (["-march=native"] if x86 and not portable else [])
    # OpenMP: at::parallel_for (a header template) runs in parallel only when the extension itself
    # is compiled with it; the runtime is the libgomp torch already loaded (same soname)
    omp = ["-fopenmp"] if openmp and _accepts(cxx, ["-fopenmp"], _OPENMP_PROBE) else []
    return flags + ["-std=c++17"] + omp, omp


def _extensions():
    if _flag("MMRNN_NO_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, get_cxx_compiler

    cxx, link = compile_flags(shlex.split(get_cxx_compiler()), _flag("MMRNN_PORTABLE"), _flag("MMRNN_DEBUG"),
                              openmp=not _flag("MMRNN_NO_OPENMP"))
    ext = CppExtension(
        name="mmrnn_ext._C",
        sources=[os.path.relpath(os.path.join(ROOT, "csrc", name), ROOT)
                 for name in ("module.cpp", "buffers.cpp", "rnn_cpu.cpp", "lstm_cpu.cpp", "gru_cpu.cpp", "cell_step.cpp",
                              "cell_train.cpp", "micro_generic.cpp", "micro_avx2.cpp", "micro_avx512.cpp",
                              "micro_avx512_bf16.cpp")],
        depends=[os.path.relpath(os.path.join(ROOT, "csrc", name), ROOT)
                 for name in ("buffers.h", "common.h", "engine.h", "micro.h", "micro_kernels.h", "platform.h")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )

    class Build(BuildExtension):
        """torch's BuildExtension, with the way out named when the compiler fails."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # the compiler's own errors are printed above; the way out last
                raise SystemExit(f"error: {type(exc).__name__}: {exc}\n{_BUILD_HELP}") from exc

    return [ext], {"build_ext": Build}


if __name__ == "__main__":  # pip runs this file as a script; scripts/check_platforms.sh imports compile_flags
    ext_modules, cmdclass = _extensions()
    setup(
        packages=["mmrnn_ext", "mmrnn_ext.bench", "mmrnn_ext.modules", "mmrnn_ext.ops", "mmrnn_ext.train",
                  "mmrnn_ext.kernels"],
        package_dir={"mmrnn_ext": "mmrnn_ext", "mmrnn_ext.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
