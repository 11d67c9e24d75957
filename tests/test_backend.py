"""The backend switch: names, set/use/env, thread scope, and which implementation each op runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import fastmsc
from fastmsc.backend import (
    BACKENDS,
    OPS,
    FusedUnavailable,
    Op,
    get_backend,
    import_failure,
    set_backend,
    use_backend,
)

VALID_LIST = r"valid backends are reference, torch, fused, auto"


def test_the_four_backends_and_the_default():
    assert BACKENDS == ("reference", "torch", "fused", "auto")
    assert fastmsc.BACKENDS == BACKENDS
    assert get_backend() == "auto"  # conftest resets to auto; auto is also the documented default


@pytest.mark.parametrize("name", BACKENDS)
def test_set_backend_round_trips(name):
    set_backend(name)
    assert get_backend() == name


@pytest.mark.parametrize("name", ["cuda", "Torch", "", "triton", None])
def test_unknown_backend_names_the_valid_ones(name):
    with pytest.raises(ValueError, match=rf"unknown fastmsc backend {name!r}.*{VALID_LIST}"):
        set_backend(name)
    with pytest.raises(ValueError, match=VALID_LIST), use_backend(name):
        pass
    assert get_backend() == "auto"


def test_use_backend_nests_and_restores_after_errors():
    set_backend("torch")
    with use_backend("reference"):
        assert get_backend() == "reference"
        with pytest.raises(RuntimeError, match="inner"), use_backend("fused"):
            assert get_backend() == "fused"
            raise RuntimeError("inner")
        assert get_backend() == "reference"
    assert get_backend() == "torch"


def test_use_backend_is_per_thread_and_set_backend_sets_the_default_for_new_threads():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with use_backend("reference"):
            entered.set()
            release.wait(10)
            seen["inside"] = get_backend()

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(10)
    seen["main while worker inside"] = get_backend()
    release.set()
    thread.join()
    assert seen == {"inside": "reference", "main while worker inside": "auto"}

    set_backend("torch")
    later = []
    thread = threading.Thread(target=lambda: later.append(get_backend()))
    thread.start()
    thread.join()
    assert later == ["torch"]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_environment_variable_sets_the_backend_at_import():
    result = _python("import fastmsc; print(fastmsc.get_backend())", FASTMSC_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


def test_unknown_environment_backend_fails_the_import_clearly():
    result = _python("import fastmsc", FASTMSC_BACKEND="gpu")
    assert result.returncode != 0
    assert "unknown fastmsc backend 'gpu'" in result.stderr and "reference, torch, fused, auto" in result.stderr


# What each op passes to fused_unsupported(device_type, *, allow_interpreter, **call_args): the fused kernels rely
# on these names.
CALLS = {
    "multiscale_conv1d": (lambda: fastmsc.multiscale_conv1d(torch.randn(2, 3, 6), [torch.randn(4, 3, 3)], None),
                          {"x", "weights", "biases", "activation"}),
    "lstm_layer": (lambda: fastmsc.lstm_layer(torch.randn(2, 4, 3), ((torch.randn(8, 3), torch.randn(8, 2), None,
                                                                       None),)),
                   {"x", "weights", "h0", "c0", "lengths", "lstm_impl"}),  # lstm_impl: the LSTM policy passed down
    "attention": (lambda: fastmsc.attention(*torch.randn(3, 2, 4, 8)), {"q", "k", "v", "lengths", "scale"}),
    "max_avg_pool": (lambda: fastmsc.max_avg_pool(torch.randn(2, 4, 3)), {"x", "lengths"}),
}


class _Spy:
    def __init__(self, label, log):
        self.label, self.log = label, log

    def __call__(self, *args, **kwargs):
        self.log.append(self.label)
        return "spied"


@pytest.fixture
def spied_ops(monkeypatch):
    """Every op's implementations replaced by spies that log which one ran; fused_unsupported answers
    from ``refuse`` (None: the fused path accepts) and records the policy passed down (``allowed``)."""
    log, refuse, seen_args = [], {"reason": None}, []
    refuse["allowed"] = []

    def fused_unsupported(device_type, *, allow_interpreter, **call_args):
        seen_args.append((device_type, set(call_args)))
        refuse["allowed"].append(allow_interpreter)
        return refuse["reason"]

    for op in OPS.values():
        for impl in ("reference", "torch", "fused"):
            monkeypatch.setattr(op, impl, _Spy(impl, log))
        monkeypatch.setattr(op, "fused_unsupported", fused_unsupported)
        monkeypatch.setattr(op, "fused_prepare", None)
    return log, refuse, seen_args


@pytest.mark.parametrize("op_name", sorted(CALLS))
def test_each_backend_runs_its_implementation(op_name, spied_ops):
    log, refuse, seen_args = spied_ops
    call, expected_args = CALLS[op_name]
    for backend in ("reference", "torch", "fused", "auto"):
        with use_backend(backend):
            assert call() == "spied"
    assert log == ["reference", "torch", "fused", "fused"]
    assert seen_args == [("cpu", expected_args)] * 2
    assert refuse["allowed"] == [True, False], "the interpreter is allowed only where 'fused' is forced"

    refuse["reason"] = "the kernel needs a full moon"
    with use_backend("auto"):
        call()
    assert log[-1] == "torch", "auto must fall back to torch when the fused path declines"
    with use_backend("fused"), pytest.raises(FusedUnavailable, match=rf"fastmsc.{op_name}.*full moon"):
        call()


def test_the_global_setting_reaches_the_ops(spied_ops):
    log, _, _ = spied_ops
    set_backend("reference")
    CALLS["max_avg_pool"][0]()
    assert log == ["reference"]


def test_missing_and_broken_fused_modules_are_reported():
    ref = lambda x: "reference"
    missing = Op("demo", ref, lambda x: "torch")
    broken = Op("demo", ref, lambda x: "torch",
                load_error=import_failure("fastmsc_test_broken_kernel", ImportError("needs a newer triton")))
    assert missing.why_not_fused("cpu") == "no fused implementation exists for this op yet"
    reason = broken.why_not_fused("cpu")
    assert "fastmsc_test_broken_kernel could not be imported" in reason and "needs a newer triton" in reason
    for op in (missing, broken):
        with use_backend("auto"):
            assert op.select("cpu")(None) == "torch"
        with use_backend("fused"), pytest.raises(FusedUnavailable, match="backend 'fused' cannot run this call"):
            op.select("cpu")


@pytest.mark.parametrize("op_name", sorted(CALLS))
def test_every_op_is_registered(op_name):
    op = OPS[op_name]
    assert op.name == op_name and callable(op.reference) and callable(op.torch)
    if op.fused is not None:  # declared by the op from its own kernel module
        assert op.fused.__module__ == f"fastmsc.kernels.{op_name}" and op.load_error is None
    else:
        assert op.load_error is not None and f"fastmsc.kernels.{op_name}" in op.load_error


@pytest.mark.parametrize("op_name", ["multiscale_conv1d", "attention", "max_avg_pool"])
def test_triton_ops_decline_gpus_older_than_ampere(op_name, monkeypatch):
    """Triton supports compute capability 8.0 and newer: on a T4 (7.5) 'auto' must use torch, in every dtype.
    CUDA tensors are fake (shape only), the capability is set by hand."""
    pytest.importorskip("triton", reason="the fused ops are Triton kernels")
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastmsc.kernels import _common
    module = importlib.import_module(f"fastmsc.kernels.{op_name}")
    if op_name == "attention":
        monkeypatch.setattr(module, "_device_shared_bytes", lambda device: 227 * 1024)
    for capability, dtype, declined in ((75, torch.bfloat16, True), (75, torch.float16, True),
                                        (70, torch.float32, True), (80, torch.bfloat16, False),
                                        (86, torch.float16, False), (90, torch.float32, False)):
        monkeypatch.setattr(_common, "compute_capability", lambda device, c=capability: c)
        with FakeTensorMode():
            x = torch.empty(2, 16, 9, dtype=dtype, device="cuda")
            weights = [torch.empty(4, 16, k, dtype=dtype, device="cuda") for k in (3, 5)]
        args = {"multiscale_conv1d": {"x": x, "weights": weights, "biases": None, "activation": None},
                "attention": {"q": x, "k": x, "v": x, "lengths": None, "scale": None},
                "max_avg_pool": {"x": x, "lengths": None}}[op_name]
        reason = module.fused_unsupported("cuda", **args)
        if declined:
            assert reason is not None and "compute capability 8.0" in reason, reason
            assert f"is {capability // 10}.{capability % 10}" in reason, reason
        else:
            assert reason is None, (capability, dtype, reason)
    # Asked about CUDA in general (as fastmsc.info() asks), the answer follows the current GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability in (70, 75, 80, 90):
        monkeypatch.setattr(_common, "compute_capability", lambda device, c=capability: c)
        general = module.fused_unsupported("cuda")
        assert (general is not None and "compute capability 8.0" in general) == (capability < 80), general
