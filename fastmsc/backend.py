"""Backend selection and per-op dispatch.

Every public op is registered here as an :class:`Op` holding its implementations. The global
backend (``set_backend``, ``use_backend`` or the ``FASTMSC_BACKEND`` environment variable) picks
which one runs:

* ``reference``: plain PyTorch written straight from the math; the oracle (float64-capable).
* ``torch``: the fastest composition of stock PyTorch ops; what a user writes without fastmsc.
* ``fused``: Triton kernels and the compiled extension; an error if the op cannot run fused.
* ``auto``: ``fused`` where it supports the tensors' device and arguments and was not measured slower than
  ``torch`` on this GPU (the dispatch table of :mod:`fastmsc.dispatch`), nor, where unmeasured, expected slower by
  the kernels' design estimate; else ``torch``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import dispatch

BACKENDS = ("reference", "torch", "fused", "auto")

_state = threading.local()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastmsc backend {name!r}; valid backends are {', '.join(BACKENDS)}")
    return name


_default_backend = _check_name(os.environ.get("FASTMSC_BACKEND", "auto").strip() or "auto")


def get_backend() -> str:
    """The backend in force in this thread."""
    return getattr(_state, "backend", _default_backend)


def set_backend(name: str) -> None:
    """Set the backend for this thread (and the default for threads that start later)."""
    global _default_backend
    _default_backend = _check_name(name)
    _state.backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with backend ``name``, then restore the previous one."""
    _check_name(name)
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        if previous is None:
            del _state.backend
        else:
            _state.backend = previous


# Which fused LSTM implementation runs (FASTMSC_LSTM_IMPL): "persistent" (the Triton kernel: one launch per layer,
# on CUDA, or on CPU tensors through the interpreter under backend 'fused'), "stepwise" (the compiled extension:
# CPU, and per-step GEMM + gate kernels on CUDA), or "auto": persistent on CUDA where it supports the layer, else
# stepwise, except where the dispatch table measured stepwise faster on this GPU (``lstm_impl_for``). Passed down to
# the LSTM op's fused path as the ``lstm_impl`` argument.
LSTM_IMPLS = ("auto", "persistent", "stepwise")


def _check_lstm_impl(name: str) -> str:
    if name not in LSTM_IMPLS:
        raise ValueError(f"unknown fastmsc LSTM implementation {name!r} (FASTMSC_LSTM_IMPL or set_lstm_impl); valid "
                         f"ones are {', '.join(LSTM_IMPLS)}")
    return name


_lstm_impl = _check_lstm_impl(os.environ.get("FASTMSC_LSTM_IMPL", "auto").strip() or "auto")


def get_lstm_impl() -> str:
    """The fused LSTM implementation in force: one of :data:`LSTM_IMPLS`."""
    return _lstm_impl


def set_lstm_impl(name: str) -> None:
    """Choose the fused LSTM implementation (what FASTMSC_LSTM_IMPL sets at import)."""
    global _lstm_impl
    _lstm_impl = _check_lstm_impl(name)


def lstm_impl_for(x: torch.Tensor, tensors) -> str:
    """The ``lstm_impl`` to pass down for a call with input ``x`` and tensor arguments ``tensors``: the one in force,
    except that ``auto`` becomes ``stepwise`` where the dispatch table measured the persistent kernel slower for
    calls of this kind (mode, dtype, size of x) on this GPU. Unmeasured calls keep ``auto`` (persistent wherever the
    kernel takes the layer)."""
    impl = get_lstm_impl()
    if impl != "auto":
        return impl
    entry = dispatch.lookup(dispatch.LSTM_IMPL_OP, x, tensors)
    return "stepwise" if entry is not None and entry.choice == "stepwise" else "auto"


@contextlib.contextmanager
def use_lstm_impl(name: str) -> Iterator[None]:
    """Context manager: the enclosed code runs with LSTM implementation ``name``, then the previous one is back."""
    previous = get_lstm_impl()
    set_lstm_impl(name)
    try:
        yield
    finally:
        set_lstm_impl(previous)


class FusedUnavailable(RuntimeError):
    """Raised when backend ``fused`` is forced for arguments no fused kernel supports."""


def import_failure(module: str, exc: BaseException) -> str:
    """The reason an op records when its fused module (``fastmsc.kernels.<op>``) failed to import."""
    return f"{module} could not be imported ({type(exc).__name__}: {exc})"


@dataclass
class Op:
    """One public op and its implementations, declared by the op's module (``fastmsc.ops.<op>``).

    ``reference`` and ``torch`` take the op's validated arguments. The fused path comes from the op's kernel
    module (``fastmsc.kernels.<op>``), which the op's module imports itself when ``fastmsc`` is imported
    (torch.compile cannot trace an import, so none may happen on a first call), guarded: a failed import (no
    triton, a broken extension) leaves ``fused`` None and its reason in ``load_error``, shown by
    :func:`fastmsc.info` and never raised at ``import fastmsc``. The kernel module provides

    * ``fused``: same signature as ``reference``;
    * ``fused_unsupported(device_type, *, allow_interpreter=False, **call_args)``: None when the fused path can
      run those arguments on that device, else a sentence saying why not; called with only the device type it
      answers for the device in general (used by :func:`fastmsc.info`). A question only: cheap, it never
      compiles, loads or warns. ``allow_interpreter`` is the backend policy passed down: whether CPU tensors may
      run Triton kernels in the interpreter (only when the user forced backend 'fused');
    * optionally ``prepare(*, fallback, **call_args)``: readies the fused path for a call about to run it (loading
      or building a compiled extension), returns None or why it cannot run; ``fallback`` says the caller then runs
      ``torch``; ``call_args`` are the call's arguments, none when it is asked about the device in general;
    * optionally ``expected_slower(device_type, **call_args)``: a sentence where the kernels' own design estimate,
      or a measurement they record (the LSTM extension per CPU class), expects them to be slower than ``torch`` for
      such calls, else None. ``auto`` follows it where the dispatch table has no measurement, so that the fused path
      never makes a user slower where that is known;
    * optionally ``cpu_dispatch_note()``: a sentence on the CPU measurements ``expected_slower`` follows, for
      :func:`fastmsc.info`, or None.
    """

    name: str
    reference: Callable
    torch: Callable
    fused: Callable | None = None
    fused_unsupported: Callable[..., str | None] | None = None
    fused_prepare: Callable[..., str | None] | None = None
    load_error: str | None = field(default=None, repr=False)
    fused_expected_slower: Callable[..., str | None] | None = None
    fused_cpu_dispatch_note: Callable[[], str | None] | None = None

    def why_not_fused(self, device_type: str, *, allow_interpreter: bool | None = None, **call_args) -> str | None:
        """Why the fused path cannot run these arguments on ``device_type``, or None. ``allow_interpreter`` None
        follows the backend in force (the interpreter only under 'fused')."""
        if self.fused is None:
            return self.load_error or "no fused implementation exists for this op yet"
        if self.fused_unsupported is None:
            return None
        if allow_interpreter is None:
            allow_interpreter = get_backend() == "fused"
        return self.fused_unsupported(device_type, allow_interpreter=allow_interpreter, **call_args)

    def expected_slower(self, device_type: str, **call_args) -> str | None:
        """Why the kernels' design estimate expects the fused path to be slower than ``torch`` for these arguments
        (``auto`` then runs torch where the dispatch table has no measurement), or None."""
        if self.fused_expected_slower is None:
            return None
        return self.fused_expected_slower(device_type, **call_args)

    def cpu_dispatch_note(self) -> str | None:
        """A sentence on the measurements behind ``expected_slower`` on this CPU (fastmsc info), or None."""
        return None if self.fused_cpu_dispatch_note is None else self.fused_cpu_dispatch_note()

    def prepare_fused(self, *, fallback: bool, **call_args) -> None:
        """Ready the fused path for a call about to run it (``fused_prepare``: e.g. load or build a compiled
        extension), given the call's arguments where known (what needs readying may depend on them). A failure is
        recorded, so :meth:`why_not_fused` reports it from then on; ``fallback``: the caller then runs ``torch``
        (warned once)."""
        if self.fused is not None and self.fused_prepare is not None:
            self.fused_prepare(fallback=fallback, **call_args)

    def select(self, device_type: str, **call_args) -> Callable:
        """The implementation the backend in force runs for these (validated) arguments. ``auto`` also
        follows the measured dispatch table (fastmsc.dispatch): torch where fused was measured slower."""
        backend = get_backend()
        if backend == "reference":
            return self.reference
        if backend == "torch":
            return self.torch
        self.prepare_fused(fallback=backend == "auto", **call_args)
        reason = self.why_not_fused(device_type, allow_interpreter=backend == "fused", **call_args)
        if reason is None:
            if backend == "auto":
                # Flattening the arguments costs microseconds a call: only where a verdict may exist.
                tensors = list(_tensors(call_args.values())) if dispatch.covers(device_type) else None
                entry = dispatch.lookup(self.name, tensors[0], tensors) if tensors else None
                if entry is not None:
                    return self.torch if entry.choice == "torch" else self.fused
                if self.expected_slower(device_type, **call_args) is not None:
                    return self.torch
            return self.fused
        if backend == "fused":
            raise FusedUnavailable(f"fastmsc.{self.name}: backend 'fused' cannot run this call: {reason}")
        return self.torch


def _tensors(values) -> Iterator:
    """The tensors among call arguments, in order, looking inside lists and tuples (weights)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    OPS[op.name] = op
    return op
