"""Build script: the fastmsc package (metadata in pyproject.toml) and the compiled LSTM extension fastmsc._C.

The extension is compiled here only when torch is importable at build time, which needs

    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)

With build isolation pip builds in a fresh environment that may lack torch or hold another version
(an extension built against another torch fails to load); then the package is built pure Python and
the extension is compiled just-in-time on first use (see fastmsc/_extension.py). Either way the C++/CUDA
sources are shipped inside the package (fastmsc/csrc) for that just-in-time build.

Environment: FASTMSC_SKIP_EXT=1 builds pure Python; MAX_JOBS caps parallel compile jobs (ninja);
FASTMSC_NO_CUDA=1 builds the CPU kernels only even where torch has CUDA and nvcc exists.
CUDA kernels are compiled for sm_75 (T4, RTX 20xx), sm_80 (whose code also runs on sm_86/sm_89: RTX 30xx/40xx,
A10, L4) and sm_90, plus compute_90 PTX (JIT-compiled by the driver on newer GPUs); TORCH_CUDA_ARCH_LIST, when
set, replaces that list as in any torch extension build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_75,code=sm_75",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package, so that an installed fastmsc can compile the extension itself."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastmsc" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for path in (ROOT / CSRC).iterdir():
            if path.suffix in (".h", ".cpp", ".cu"):
                shutil.copy2(path, target / path.name)


def _log(message: str) -> None:
    print(f"fastmsc setup: {message}", file=sys.stderr)


def extension_config():
    """(ext_modules, cmdclass) for the compiled extension, or empty ones for a pure-Python build."""
    if os.environ.get("FASTMSC_SKIP_EXT") == "1":
        _log("FASTMSC_SKIP_EXT=1: building pure Python; the LSTM extension is compiled just-in-time on first use")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable in the build environment (use `pip install --no-build-isolation .`): "
             "building pure Python; the LSTM extension is compiled just-in-time on first use")
        return [], {}
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # at::parallel_for is OpenMP in the headers
    cxx_flags = ["-O3", *openmp, "-DFASTMSC_PYTHON_MODULE"]
    sources = [f"{CSRC}/lstm_cpu.cpp"]
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FASTMSC_NO_CUDA") != "1")
    common = dict(name="fastmsc._C", include_dirs=[str(ROOT / CSRC)], extra_link_args=openmp)
    if with_cuda:
        _log(f"building the LSTM extension with CUDA kernels (nvcc from {cpp_extension.CUDA_HOME})")
        # Without -gencode flags torch's build takes its architectures from TORCH_CUDA_ARCH_LIST.
        arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else CUDA_ARCH_FLAGS
        ext = cpp_extension.CUDAExtension(
            sources=sources + [f"{CSRC}/lstm_cuda.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", *arch_flags]},
            **common,
        )
    else:
        _log("building the LSTM extension for CPU (torch without CUDA or no nvcc found)")
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_config()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
