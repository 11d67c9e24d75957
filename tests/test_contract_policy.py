"""The op contract and the policy boundary: each op declares its fused path from its own kernel module, the
backend policy reaches the kernels only as arguments, and asking whether the fused path can run never builds,
loads or warns."""

from __future__ import annotations

import warnings

import pytest
from test_layout import import_graph

import fastmsc
from fastmsc import _extension
from fastmsc.backend import OPS


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_kernel_module_reaches_the_backend():
    """The kernels answer for the arguments they are given (allow_interpreter included), never by reading the
    backend in force."""
    graph = import_graph()
    kernels = [m for m in graph if m == "fastmsc.kernels" or m.startswith("fastmsc.kernels.")]
    assert kernels
    reaching = {m: sorted(t for t in _reachable(graph, m) if t in ("fastmsc.backend", "fastmsc.dispatch"))
                for m in kernels}
    assert {m: t for m, t in reaching.items() if t} == {}


@pytest.mark.parametrize("op_name", sorted(OPS))
def test_each_op_imports_its_kernel_module_itself(op_name):
    graph = import_graph()
    assert f"fastmsc.kernels.{op_name}" in graph[f"fastmsc.ops.{op_name}"]


def test_the_interpreter_is_allowed_only_where_fused_is_forced():
    pytest.importorskip("triton")
    from fastmsc.kernels import _common

    if not _common.INTERPRETED:
        pytest.skip("the Triton interpreter is off in this process")
    op = OPS["max_avg_pool"]
    assert op.why_not_fused("cpu", allow_interpreter=True) is None
    assert "interpreter" in op.why_not_fused("cpu", allow_interpreter=False)
    with fastmsc.use_backend("fused"):
        assert op.why_not_fused("cpu") is None  # None follows the backend in force
    with fastmsc.use_backend("auto"):
        assert op.why_not_fused("cpu") is not None


@pytest.fixture
def unloaded_extension(monkeypatch):
    """The extension as a fresh process sees it (not loaded, no attempt yet), with building and loading made to
    fail the test, so that any question that would build or load is caught."""
    def forbidden(*args, **kwargs):
        raise AssertionError("asking whether the fused LSTM can run must not build or load the extension")

    monkeypatch.setattr(_extension, "_state", {"done": False, "error": None, "origin": None})
    monkeypatch.setattr(_extension, "ops_registered", lambda: False)
    monkeypatch.setattr(_extension, "jit_build", forbidden)
    monkeypatch.setattr(_extension, "load", forbidden)


def test_asking_about_the_fused_lstm_never_builds_loads_or_warns(unloaded_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("auto", "fused"):
            with fastmsc.use_backend(backend):
                OPS["lstm_layer"].why_not_fused("cpu")
                OPS["lstm_layer"].why_not_fused("cuda")
        data = fastmsc.info()
    assert isinstance(data["lstm_extension"], str) and data["lstm_extension"]


def test_a_missing_toolchain_is_reported_without_building(unloaded_extension, monkeypatch, tmp_path):
    find_spec = _extension.importlib.util.find_spec
    monkeypatch.setattr(_extension.importlib.util, "find_spec",  # no prebuilt fastmsc._C
                        lambda name, *a: None if name == "fastmsc._C" else find_spec(name, *a))
    monkeypatch.setenv("FASTMSC_EXT_DIR", str(tmp_path))  # no cached build
    monkeypatch.setenv("CXX", "fastmsc-test-no-such-compiler")
    monkeypatch.setattr(_extension, "_tools_missing", [])
    reason = OPS["lstm_layer"].why_not_fused("cpu")
    assert reason is not None and "fastmsc-test-no-such-compiler" in reason
    assert "fastmsc-test-no-such-compiler" in _extension.describe()
