"""Loading of the compiled LSTM extension (``torch.ops.fastmsc.lstm_fwd`` / ``lstm_bwd``).

Order of attempts, first success wins, the outcome is cached for the process:

1. ``fastmsc._C``, built by ``pip install --no-build-isolation .`` (setup.py) when torch was importable.
2. A just-in-time build of the sources with ``torch.utils.cpp_extension.load`` (ninja), cached in
   ``$FASTMSC_EXT_DIR`` or ``~/.cache/fastmsc``, in a folder keyed by the torch version and a hash of
   the sources, so a new torch or edited sources rebuild and an unchanged setup loads in milliseconds.

``load()`` returns None on success and raises :class:`ExtensionUnavailable` (with the reason and how to
fix it) otherwise; :func:`unavailable_reason` gives the same as a string. Both may build (minutes), so
the question "can the fused LSTM run?" asks :func:`availability` instead, which never builds, loads or
warns: the first real fused call loads (or builds) the extension. Nothing here runs at ``import fastmsc``.

A compiled ``fastmsc._C`` comes with ``_build_info.json`` beside it (written by setup.py: the torch and CUDA
versions and CUDA architectures it was built for), read only by :func:`describe` and
:func:`cuda_kernels_expected`.

The JIT build holds an OS lock on ``<build folder>/fastmsc.build.lock``: torch's own marker file ``lock``
outlives a build process that was killed and then makes every later load wait forever, whereas the kernel
releases the OS lock with the process. Under that lock no other fastmsc build of the folder runs, so a
``lock`` found there is stale and is removed. Without fcntl (Windows) there is no OS lock and torch's file rules
alone, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

_LOG = logging.getLogger("fastmsc")
_SOURCE_NAMES = ("lstm_cpu.cpp", "lstm_cuda.cu", "lstm_gates.h", "lstm_common.h", "lstm_cpu_panels.h")
_BUILD_INFO_NAME = "_build_info.json"
_OS_LOCK_NAME = "fastmsc.build.lock"
_TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build folder
_lock = threading.Lock()
_state: dict = {"done": False, "error": None, "origin": None}


class ExtensionUnavailable(RuntimeError):
    """The compiled LSTM extension could not be imported or built; the message says why and how to fix it."""


def source_dir() -> Path | None:
    """The C++/CUDA sources: ``fastmsc/csrc`` in an installed package, ``csrc/`` beside it in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "lstm_cpu.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get("FASTMSC_EXT_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fastmsc"


def ops_registered() -> bool:
    """Whether fastmsc::lstm_fwd and lstm_bwd exist in torch's op registry (from whichever build)."""
    try:
        torch.ops.fastmsc.lstm_fwd.default  # noqa: B018
        torch.ops.fastmsc.lstm_bwd.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def has_cuda_kernels() -> bool:
    """Whether the loaded build has CUDA kernels (built with nvcc against a CUDA torch)."""
    return ops_registered() and torch._C._dispatch_has_kernel_for_dispatch_key("fastmsc::lstm_fwd", "CUDA")


def _jit_wants_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    # at::parallel_for is OpenMP in the header: without -fopenmp it silently runs on one thread.
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def _build_key(sources: list[Path], with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(b"cuda" if with_cuda else b"cpu")
    version = torch.__version__.replace("+", "_").replace(".", "_")
    return f"torch{version}_{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[bool]:
    """Hold the OS lock of ``build_dir``, waiting while another process builds there; yields whether it is held
    (False without fcntl: Windows)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(build_dir / _OS_LOCK_NAME, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_locked(build_dir: Path, **load_args) -> object:
    """``torch.utils.cpp_extension.load(build_directory=build_dir, **load_args)`` under the OS lock of
    ``build_dir``, after removing a stale torch ``lock`` file left there by a build process that was killed."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir) as held:
        stale = build_dir / _TORCH_LOCK_NAME
        # Without the OS lock a `lock` may belong to a build running now: torch's own waiting is all there is.
        if held and stale.exists():
            _LOG.warning("fastmsc: removing %s, left by an extension build that did not finish", stale)
            stale.unlink(missing_ok=True)
        return load(build_directory=str(build_dir), **load_args)


def jit_build(verbose: bool = False) -> Path:
    """Build (or reuse the cached build of) the extension and load it into torch.ops; returns the build folder."""
    src = source_dir()
    if src is None:
        raise ExtensionUnavailable("the C++ sources (csrc/lstm_cpu.cpp) are not in this installation")
    with_cuda = _jit_wants_cuda() and (src / "lstm_cuda.cu").is_file()
    sources = [src / "lstm_cpu.cpp"] + ([src / "lstm_cuda.cu"] if with_cuda else [])
    key = _build_key([src / name for name in _SOURCE_NAMES if (src / name).is_file()], with_cuda)
    build_dir = cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob("*.so")):
        _LOG.warning("fastmsc: compiling the LSTM extension once into %s (about a minute per source file)", build_dir)
    cuda_flags = ["-O3", "--use_fast_math"] if with_cuda else None
    load_locked(
        build_dir,
        name=f"fastmsc_lstm_{key.rsplit('_', 1)[-1]}",
        sources=[str(p) for p in sources],
        extra_cflags=["-O3", *_openmp_flags()],
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=_openmp_flags(),
        extra_include_paths=[str(src)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    return build_dir


def _load_locked() -> None:
    if ops_registered():  # already loaded (by this module earlier, or by the user)
        _state["origin"] = _state["origin"] or "already registered"
        return
    prebuilt_error = None
    try:
        importlib.import_module("fastmsc._C")
        if ops_registered():
            _state["origin"] = "fastmsc._C"
            return
        prebuilt_error = "fastmsc._C imported but registered no lstm ops"
    except ImportError as exc:  # absent (pure-Python install) or built against another torch (undefined symbol)
        prebuilt_error = f"{type(exc).__name__}: {exc}"
    try:
        build_dir = jit_build()
    except Exception as exc:  # compiler missing, build error, load error: all mean "no extension"
        raise ExtensionUnavailable(
            f"the compiled LSTM extension is unavailable (prebuilt fastmsc._C: {prebuilt_error}; just-in-time build: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}). Fix: install "
            "a C++ compiler and ninja and run once with a writable $FASTMSC_EXT_DIR or ~/.cache/fastmsc, or "
            "reinstall with `pip install --no-build-isolation .` against the torch you run"
        ) from exc
    if not ops_registered():
        raise ExtensionUnavailable(f"the extension built in {build_dir} registered no fastmsc::lstm ops")
    _state["origin"] = f"JIT build in {build_dir}"


def load() -> None:
    """Make torch.ops.fastmsc.lstm_fwd/lstm_bwd available, or raise ExtensionUnavailable (cached)."""
    if _state["done"]:
        if _state["error"] is not None:
            raise ExtensionUnavailable(_state["error"])
        return
    with _lock:
        if not _state["done"]:
            try:
                _load_locked()
            except ExtensionUnavailable as exc:
                _state["error"] = str(exc)
            _state["done"] = True
    if _state["error"] is not None:
        raise ExtensionUnavailable(_state["error"])


@torch.compiler.assume_constant_result  # loading takes locks Dynamo cannot trace; the answer is fixed per process
def unavailable_reason() -> str | None:
    """None when the extension is loaded (loading it if needed), else why it is not."""
    try:
        load()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


def origin() -> str | None:
    """Where the loaded ops came from ("fastmsc._C" or the JIT build folder); None before loading."""
    return _state["origin"]


@torch.compiler.assume_constant_result  # file-system probes Dynamo cannot trace; fixed while it traces
def availability() -> str | None:
    """None when the extension is loaded or can be loaded on first use, else why not; never builds or loads.

    Loadable means: a prebuilt ``fastmsc._C`` is installed, or a JIT build of these sources for this torch is
    cached, or one can be built (the sources, a C++ compiler and ninja are present). Once a load was attempted
    its outcome is the answer, so a build that failed is reported from then on.
    """
    if _state["done"]:
        return _state["error"]
    if ops_registered() or importlib.util.find_spec("fastmsc._C") is not None:
        return None
    src = source_dir()
    if src is None:
        return "the compiled LSTM extension is unavailable: no prebuilt fastmsc._C and no C++ sources to build"
    if _cached_build(src) is not None:
        return None
    return _build_tools_missing()


def _cached_build(src: Path) -> Path | None:
    """The cache folder of a finished JIT build of the sources in ``src`` for this torch, or None."""
    with_cuda = _jit_wants_cuda() and (src / "lstm_cuda.cu").is_file()
    key = _build_key([src / name for name in _SOURCE_NAMES if (src / name).is_file()], with_cuda)
    build_dir = cache_dir() / key
    return build_dir if any(build_dir.glob("*.so")) else None


_tools_missing: list[str | None] = []


def _build_tools_missing() -> str | None:
    """Why a JIT build cannot start (no C++ compiler, no ninja), or None; probed once per process."""
    if not _tools_missing:
        compiler = os.environ.get("CXX", "c++")
        ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
        missing = [what for what, found in ((f"the C++ compiler {compiler!r}", shutil.which(compiler)),
                                            ("ninja", ninja)) if not found]
        _tools_missing.append(
            None if not missing else
            f"the compiled LSTM extension is unavailable: no prebuilt fastmsc._C, and {' and '.join(missing)} "
            "needed to build it just in time not found. Fix: install a C++ compiler and ninja, or reinstall with "
            "`pip install --no-build-isolation .` against the torch you run")
    return _tools_missing[0]


def _prebuilt_origin() -> str | None:
    """Where the prebuilt fastmsc._C lies (without importing it), or None when there is none."""
    spec = importlib.util.find_spec("fastmsc._C")
    return None if spec is None else spec.origin


def build_info() -> dict | None:
    """What the prebuilt fastmsc._C was built against (``torch``, ``cuda`` or None, ``cuda_archs`` or None), as
    setup.py recorded it; None when there is no prebuilt extension or no readable record of it."""
    prebuilt = _prebuilt_origin()
    if prebuilt is None:
        return None
    try:
        info = json.loads((Path(prebuilt).parent / _BUILD_INFO_NAME).read_text())
    except (OSError, ValueError):  # built before builds were recorded, or the record is damaged
        return None
    return info if isinstance(info, dict) and isinstance(info.get("torch"), str) else None


def _prebuilt_mismatch(info: dict | None) -> str | None:
    """Why the prebuilt fastmsc._C will likely fail to load under the running torch, or None."""
    if info is None or info["torch"] == torch.__version__:
        return None
    return f"built for torch {info['torch']}, this is torch {torch.__version__}"


def _describe_build(info: dict | None) -> str:
    if info is None:
        return "no build record"
    if info.get("cuda") is None:
        return f"built for torch {info['torch']}, CPU"
    archs = info.get("cuda_archs") or []
    return f"built for torch {info['torch']}, CUDA {info['cuda']}" + (f", {' '.join(archs)}" if archs else "")


def describe() -> str:
    """Where the extension comes from, for ``fastmsc info``: the loaded build, or what the first use will do
    (never builds or loads)."""
    if origin() is not None:
        return f"loaded ({origin()})"
    if _state["done"]:
        return f"unavailable ({_state['error']})"
    if ops_registered():
        return "loaded (already registered)"
    prebuilt = None
    if _prebuilt_origin() is not None:
        info = build_info()
        mismatch = _prebuilt_mismatch(info)
        if mismatch is None:
            return f"prebuilt fastmsc._C ({_describe_build(info)}), loaded on first use"
        prebuilt = f"prebuilt fastmsc._C {mismatch}, so it will likely fail to load and the JIT build is used instead: "
    src = source_dir()
    if src is None:
        if prebuilt is not None:
            return prebuilt + "unavailable (the C++ sources to build it are not in this installation)"
        return "unavailable (no prebuilt fastmsc._C and no C++ sources)"
    prebuilt = prebuilt or ""
    cached = _cached_build(src)
    if cached is not None:
        return f"{prebuilt}cached JIT build in {cached}, loaded on first use"
    missing = _build_tools_missing()
    if missing is not None:
        return f"{prebuilt}unavailable ({missing})"
    return f"{prebuilt}built just in time on first use (about a minute per source file) into {cache_dir()}"


def cuda_kernels_expected() -> bool:
    """Whether the build in use has, or the build the first use will load is expected to have, CUDA kernels;
    never builds or loads. A prebuilt fastmsc._C has them when its build record says so (one without a record is
    taken to have them, as setup.py builds them wherever nvcc exists); one built for another torch will likely
    fail to load, so the JIT build's answer counts then."""
    if ops_registered():
        return has_cuda_kernels()
    if _prebuilt_origin() is not None:
        info = build_info()
        if info is None:
            return True
        if _prebuilt_mismatch(info) is None:
            return info.get("cuda") is not None
    src = source_dir()
    return src is not None and _jit_wants_cuda() and (src / "lstm_cuda.cu").is_file()
