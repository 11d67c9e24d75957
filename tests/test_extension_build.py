"""How the LSTM extension is found and built, without compiling it: the build record of a prebuilt fastmsc._C as
``fastmsc info`` reports it, and the JIT build's lock (a stale torch ``lock`` file left by a killed build must not
make the next load wait forever; a live build's must). The locking is shown with a tiny C++ file that includes no
torch header, so it compiles in about a second; tests/test_lstm_layer_fused.py repeats it on the real extension's
cached build.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmsc import _extension

try:
    import fcntl
except ImportError:  # Windows: no OS lock, torch's lock file alone
    fcntl = None

needs_fcntl = pytest.mark.skipif(fcntl is None, reason="the JIT build's OS lock needs fcntl (not on Windows)")

PROBE_SOURCE = 'extern "C" int fastmsc_lock_probe() { return 42; }\n'
PROBE_LOAD = (
    "import sys\nfrom pathlib import Path\nfrom fastmsc import _extension\n"
    "_extension.load_locked(Path(sys.argv[1]), name='fastmsc_lock_probe', sources=[sys.argv[2]], "
    "is_python_module=False)\nprint('loaded')\n"
)


def _prebuilt_with_record(monkeypatch, tmp_path: Path, record: dict | None) -> None:
    """Make fastmsc._C look installed in ``tmp_path`` with ``record`` as its build record (None: no record)."""
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    if record is not None:
        (tmp_path / "_build_info.json").write_text(json.dumps(record))
    monkeypatch.setattr(_extension, "_prebuilt_origin", lambda: str(so))
    monkeypatch.setattr(_extension, "_state", {"done": False, "error": None, "origin": None})
    monkeypatch.setattr(_extension, "ops_registered", lambda: False)


def test_describe_prebuilt_for_this_torch(monkeypatch, tmp_path):
    _prebuilt_with_record(monkeypatch, tmp_path, {"torch": torch.__version__, "cuda": None, "cuda_archs": None})
    expected = f"prebuilt fastmsc._C (built for torch {torch.__version__}, CPU), loaded on first use"
    assert _extension.describe() == expected
    assert _extension.cuda_kernels_expected() is False


def test_describe_prebuilt_with_cuda(monkeypatch, tmp_path):
    record = {"torch": torch.__version__, "cuda": "12.6", "cuda_archs": ["sm_80", "sm_90", "compute_90"]}
    _prebuilt_with_record(monkeypatch, tmp_path, record)
    assert f"built for torch {torch.__version__}, CUDA 12.6, sm_80 sm_90 compute_90" in _extension.describe()
    assert _extension.cuda_kernels_expected() is True


def test_describe_prebuilt_for_another_torch_says_jit_build(monkeypatch, tmp_path):
    _prebuilt_with_record(monkeypatch, tmp_path, {"torch": "2.0.0+cpu", "cuda": None, "cuda_archs": None})
    text = _extension.describe()
    assert text.startswith(f"prebuilt fastmsc._C built for torch 2.0.0+cpu, this is torch {torch.__version__}, so "
                           "it will likely fail to load and the JIT build is used instead: "), text
    assert "built just in time" in text or "cached JIT build" in text or "unavailable" in text, text


@pytest.mark.parametrize("record", [None, "not json"])
def test_describe_prebuilt_without_readable_record(monkeypatch, tmp_path, record):
    _prebuilt_with_record(monkeypatch, tmp_path, None)
    if record is not None:
        (tmp_path / "_build_info.json").write_text(record)
    assert _extension.build_info() is None
    assert _extension.describe() == "prebuilt fastmsc._C (no build record), loaded on first use"


@pytest.fixture
def probe(tmp_path) -> tuple[Path, Path]:
    """A fresh build folder and the tiny source to build in it."""
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE_SOURCE)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    return build_dir, source


def _start_probe(build_dir: Path, source: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE_LOAD, str(build_dir), str(source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the load still waited after {timeout} s (stale lock not removed?):\n{err}")
    assert process.returncode == 0, f"the load exited {process.returncode}:\n{err}"
    return out, err


@needs_fcntl
def test_stale_torch_lock_is_removed(probe):
    build_dir, source = probe
    (build_dir / "lock").touch()  # what a build process killed mid-build leaves behind
    out, err = _finish(_start_probe(build_dir, source))
    assert out.strip() == "loaded"
    assert "left by an extension build that did not finish" in err
    assert not (build_dir / "lock").exists()
    assert list(build_dir.glob("*.so")), "nothing was built"


@needs_fcntl
def test_live_build_is_waited_for(probe):
    """While another process builds (holding the OS lock, its torch ``lock`` present) a load waits, leaves that
    ``lock`` alone, and goes on once the build is done."""
    build_dir, source = probe
    with open(build_dir / "fastmsc.build.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        (build_dir / "lock").touch()
        process = _start_probe(build_dir, source)
        time.sleep(2.0)  # ample for the load to reach the OS lock (it would delete `lock` right after)
        assert process.poll() is None, "the load did not wait for the OS lock"
        assert (build_dir / "lock").exists(), "a live build's lock was removed"
        (build_dir / "lock").unlink()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    out, err = _finish(process)
    assert out.strip() == "loaded"
    assert "did not finish" not in err


def test_without_fcntl_a_lock_file_is_left_to_torch(monkeypatch, tmp_path):
    """Without an OS lock (Windows) a ``lock`` may be a running build's: it stays, and load() still runs."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    (tmp_path / "lock").touch()
    _extension.load_locked(tmp_path, name="probe", sources=[])
    assert (tmp_path / "lock").exists()
    assert calls == [{"build_directory": str(tmp_path), "name": "probe", "sources": []}]
    assert not (tmp_path / "fastmsc.build.lock").exists()
