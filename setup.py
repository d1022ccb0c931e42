"""Builds mmrnn_ext, with its C++ CPU backend (csrc/) compiled against the installed torch.

Install without build isolation, so the extension is compiled against the torch it will run with:

    pip install --no-build-isolation .

Environment switches:
    MMRNN_NO_EXTENSION=1   skip the C++ build (the package then runs on its Triton/reference backends)
    MMRNN_PORTABLE=1       compile without -march=native (for a wheel that runs on other CPUs)
    MMRNN_DEBUG=1          compile with -O0 -g
"""
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    if _flag("MMRNN_NO_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    if _flag("MMRNN_DEBUG"):
        cxx = ["-O0", "-g"]
    else:
        # -O3 vectorises the per-step elementwise pass; without trapping math GCC may if-convert
        # the selects in tanh_f32 (it refuses otherwise: "control flow in loop"), as torch's own
        # build does. -march=native lets it use the build machine's widest SIMD (the package is
        # compiled where it is installed).
        cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + ([] if _flag("MMRNN_PORTABLE") else ["-march=native"])
    ext = CppExtension(
        name="mmrnn_ext._C",
        sources=[os.path.relpath(os.path.join(ROOT, "csrc", name), ROOT)
                 for name in ("module.cpp", "rnn_cpu.cpp", "lstm_cpu.cpp", "gru_cpu.cpp", "cell_step.cpp",
                              "cell_train.cpp")],
        depends=[os.path.relpath(os.path.join(ROOT, "csrc", name), ROOT) for name in ("common.h", "engine.h")],
        # OpenMP: at::parallel_for (a header template) runs in parallel only when the extension itself
        # is compiled with it; the runtime is the libgomp torch already loaded (same soname)
        extra_compile_args={"cxx": cxx + ["-std=c++17", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=["mmrnn_ext", "mmrnn_ext.modules", "mmrnn_ext.ops", "mmrnn_ext.train", "mmrnn_ext.kernels"],
    package_dir={"mmrnn_ext": "mmrnn_ext", "mmrnn_ext.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
