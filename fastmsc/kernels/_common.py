"""Helpers shared by the Triton-backed fused ops."""

from __future__ import annotations

import os

import torch

from .._device import compute_capability
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
        # The current GPU, so that fastmsc.info() shows the reason; each call also checks its tensors' GPU.
        return _capability_reason(torch.device("cuda")) if torch.cuda.is_available() else None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and get_backend() == "fused":
            return None
        return ("Triton kernels run on CUDA tensors; CPU tensors run them only in the Triton interpreter "
                "(TRITON_INTERPRET=1 with backend 'fused'), which is for testing")
    return f"no Triton kernels for device type {device_type!r}"


def capability_unsupported(tensor: torch.Tensor | None) -> str | None:
    """Why the Triton kernels cannot take ``tensor`` because it lives on a GPU older than Ampere, or None.

    Triton supports compute capability 8.0 and newer (its bfloat16 conversions and tensor-core products need
    it), and the kernels' resource checks (fastmsc.tools.aot) cover sm_80 and sm_90: on a T4, V100 or
    RTX 20xx stock PyTorch runs these ops instead."""
    if tensor is None or tensor.device.type != "cuda":
        return None
    return _capability_reason(tensor.device)


def _capability_reason(device: torch.device) -> str | None:
    capability = compute_capability(device)
    if capability >= 80:
        return None
    return (f"the Triton kernels need a GPU of compute capability 8.0 or newer (Ampere); this one is "
            f"{capability // 10}.{capability % 10}")
