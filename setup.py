"""Build script: the fastmsc package (metadata in pyproject.toml) and the compiled LSTM extension fastmsc._C.

The extension is compiled here only when torch is importable at build time, which needs

    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)

With build isolation pip builds in a fresh environment that may lack torch or hold another version
(an extension built against another torch fails to load); then the package is built pure Python and
the extension is compiled just-in-time on first use (see fastmsc/_extension.py). Either way the C++/CUDA
sources are shipped inside the package (fastmsc/csrc) for that just-in-time build. A compiled extension comes
with fastmsc/_build_info.json (the torch and CUDA versions and CUDA architectures it was built for), which
`fastmsc info` reads to tell whether the prebuilt fastmsc._C suits the torch it runs with.

A platform wheel holding the compiled extension: `pip wheel --no-build-isolation --no-deps .` (or from the sdist,
`python -m build --sdist --no-isolation`).

Environment: FASTMSC_SKIP_EXT=1 builds pure Python; MAX_JOBS caps parallel compile jobs (ninja);
FASTMSC_NO_CUDA=1 builds the CPU kernels only even where torch has CUDA and nvcc exists.
CUDA kernels are compiled for sm_75 (T4, RTX 20xx), sm_80 (whose code also runs on sm_86/sm_89: RTX 30xx/40xx,
A10, L4) and sm_90, plus compute_90 PTX (JIT-compiled by the driver on newer GPUs); TORCH_CUDA_ARCH_LIST, when
set, replaces that list as in any torch extension build.
"""

from __future__ import annotations

import json
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


BUILD_INFO_NAME = "_build_info.json"


def _cuda_archs(arch_flags: list[str]) -> list[str]:
    """The CUDA architectures the kernels are compiled for: sm_XY (machine code) and compute_XY (PTX)."""
    if not arch_flags:
        return os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()
    return [flag.rsplit("code=", 1)[-1] for flag in arch_flags]


def _build_ext_recording(base, build_info: dict):
    """``base`` (torch's BuildExtension) that also writes ``build_info`` beside the compiled fastmsc._C.

    The record is written only here, when the extension is compiled, so a pure-Python build never carries one
    that describes an extension it lacks. Beside the .so it lands in build_lib for a wheel and in the source
    tree for an in-place (editable) build.
    """

    class BuildExtRecording(base):
        def _build_info_path(self) -> Path:
            return Path(self.get_ext_fullpath("fastmsc._C")).parent / BUILD_INFO_NAME

        def run(self):
            super().run()
            path = self._build_info_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(build_info, indent=2) + "\n")
            _log(f"recorded the build in {path}: {build_info}")

        def get_outputs(self):
            return [*super().get_outputs(), str(self._build_info_path())]

    return BuildExtRecording


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
        cuda_archs = _cuda_archs(arch_flags)
        ext = cpp_extension.CUDAExtension(
            sources=sources + [f"{CSRC}/lstm_cuda.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", *arch_flags]},
            **common,
        )
    else:
        _log("building the LSTM extension for CPU (torch without CUDA or no nvcc found)")
        ext = cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
        cuda_archs = None
    build_info = {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
                  "cuda_archs": cuda_archs}
    build_ext = _build_ext_recording(cpp_extension.BuildExtension.with_options(use_ninja=True), build_info)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extension_config()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
