"""Helpers shared by the Triton-backed fused ops."""

from __future__ import annotations

import os

import torch

from ..backend import get_backend


def poison_enabled() -> bool:
    """FASTMSC_POISON=1 (set by the test suite) fills kernel outputs with NaN / -1 before launch,
    so an element a kernel forgets to write fails the comparison instead of passing by luck."""
    return os.environ.get("FASTMSC_POISON") == "1"


def new_output(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer for a kernel to fill (poisoned under FASTMSC_POISON=1)."""
    if not poison_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def triton_unsupported(device_type: str) -> str | None:
    """Why a Triton kernel cannot run on ``device_type`` now, or None.

    On CPU the kernels run only through the Triton interpreter (TRITON_INTERPRET=1), which is a test
    tool, not a fast path: it is used only when backend 'fused' is forced, never picked by 'auto'.
    """
    try:
        import triton  # noqa: F401
    except Exception as exc:  # any import failure (missing, broken install) means no Triton path
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and get_backend() == "fused":
            return None
        return ("Triton kernels run on CUDA tensors; CPU tensors run them only in the Triton interpreter "
                "(TRITON_INTERPRET=1 with backend 'fused'), which is for testing")
    return f"no Triton kernels for device type {device_type!r}"
