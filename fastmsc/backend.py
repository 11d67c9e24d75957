"""Backend selection and per-op dispatch.

Every public op is registered here as an :class:`Op` holding its implementations. The global
backend (``set_backend``, ``use_backend`` or the ``FASTMSC_BACKEND`` environment variable) picks
which one runs:

* ``reference``: plain PyTorch written straight from the math; the oracle (float64-capable).
* ``torch``: the fastest composition of stock PyTorch ops; what a user writes without fastmsc.
* ``fused``: Triton kernels and the compiled extension; an error if the op cannot run fused.
* ``auto``: ``fused`` where it supports the tensors' device and arguments, else ``torch``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

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


class FusedUnavailable(RuntimeError):
    """Raised when backend ``fused`` is forced for arguments no fused kernel supports."""


@dataclass
class Op:
    """One public op and its implementations.

    ``fused_unsupported(device_type, **call_args)`` returns ``None`` when the fused implementation
    can run those arguments on that device, else a sentence saying why not. Called with only the
    device type it answers for the device in general (used by :func:`fastmsc.info`).
    """

    name: str
    reference: Callable
    torch: Callable
    fused: Callable | None = None
    fused_unsupported: Callable[..., str | None] | None = None
    notes: dict = field(default_factory=dict)

    def why_not_fused(self, device_type: str, **call_args) -> str | None:
        if self.fused is None:
            return "no fused implementation is installed for this op"
        if self.fused_unsupported is None:
            return None
        return self.fused_unsupported(device_type, **call_args)

    def select(self, device_type: str, **call_args) -> Callable:
        backend = get_backend()
        if backend == "reference":
            return self.reference
        if backend == "torch":
            return self.torch
        reason = self.why_not_fused(device_type, **call_args)
        if reason is None:
            return self.fused
        if backend == "fused":
            raise FusedUnavailable(f"fastmsc.{self.name}: backend 'fused' cannot run this call: {reason}")
        return self.torch


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    OPS[op.name] = op
    return op
