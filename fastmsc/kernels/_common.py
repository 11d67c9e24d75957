"""Triton platform facts and helpers shared by the Triton-backed fused ops.

The one home of what the kernels ask about the platform: whether launches run in the Triton interpreter,
the precision of ``tl.dot`` on float32 operands, the GPU's compute capability, dtype names, and the checks every
op's ``fused_unsupported`` opens with. Nothing here reads the backend policy: the caller passes it
(``allow_interpreter``), so kernels never depend on :mod:`fastmsc.backend`.
"""

from __future__ import annotations

import os

import torch

from .._device import compute_capability, dtype_name

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel modules are imported
# (just after this one): read once here, the answer matches how every kernel of the process was built.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# The dtypes every Triton kernel takes (no float64: the GPUs' fp64 dot throughput makes torch the better path).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["INTERPRETED", "TRITON_DTYPES", "capability_unsupported", "compute_capability",
           "dtype_name", "interpreting", "matmul_precision", "new_output", "poison_enabled", "tensor_core_precision",
           "triton_call_unsupported", "triton_unsupported"]


def interpreting(device: torch.device | None = None) -> bool:
    """Whether kernel launches run in the Triton interpreter. The device does not change the answer: under
    TRITON_INTERPRET=1 every launch is interpreted, and without it a CPU tensor is never launched on."""
    return INTERPRETED


def tensor_core_precision(dtype: torch.dtype, *, allow_tf32: bool) -> str:
    """``tl.dot``'s input precision for kernels whose float32 products always run on tensor cores: "tf32" where
    torch's matching flag allows TF32 (``allow_tf32``: torch.backends.cuda.matmul.allow_tf32 for matmuls,
    torch.backends.cudnn.allow_tf32 for convolutions, as the torch op being replaced would read it), else
    "tf32x3" (three TF32 products per product, close to IEEE fp32 accuracy: about 2^-21 relative, against
    TF32's 2^-11). IEEE fp32 ``tl.dot`` runs on FMA units at a fraction of tensor-core speed and holds whole
    reduction strips per thread in registers. Half operands: "ieee" (their native tensor-core products)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


def matmul_precision(dtype: torch.dtype) -> str:
    """:func:`tensor_core_precision` under torch's float32 matmul flag (torch.backends.cuda.matmul.allow_tf32,
    which torch.set_float32_matmul_precision("high") sets)."""
    return tensor_core_precision(dtype, allow_tf32=torch.backends.cuda.matmul.allow_tf32)


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


def triton_unsupported(device_type: str, *, allow_interpreter: bool = False) -> str | None:
    """Why a Triton kernel cannot run on ``device_type`` now, or None.

    On CPU the kernels run only through the Triton interpreter (TRITON_INTERPRET=1), which is a test
    tool, not a fast path: the caller allows it (``allow_interpreter``) only where the user forced the
    fused path (backend 'fused'), never where 'auto' chooses.
    """
    try:
        import triton  # noqa: F401
    except Exception as exc:  # any import failure (missing, broken install) means no Triton path
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    if device_type == "cuda":
        # The current GPU, so that fastmsc.info() shows the reason; each call also checks its tensors' GPU.
        return _capability_reason(torch.device("cuda")) if torch.cuda.is_available() else None
    if device_type == "cpu":
        if INTERPRETED and allow_interpreter:
            return None
        return ("Triton kernels run on CUDA tensors; CPU tensors run them only in the Triton interpreter "
                "(TRITON_INTERPRET=1 with backend 'fused'), which is for testing")
    return f"no Triton kernels for device type {device_type!r}"


def triton_call_unsupported(device_type: str, main: torch.Tensor | None, *, kernels: str,
                            allow_interpreter: bool = False) -> str | None:
    """The opening every Triton op's ``fused_unsupported`` shares: the platform (:func:`triton_unsupported`),
    then, for a call (``main`` its main input tensor, None when asked about the device in general), the dtype
    and the tensor's GPU. ``kernels`` names the kernels in the reason ("the attention kernels")."""
    reason = triton_unsupported(device_type, allow_interpreter=allow_interpreter)
    if reason is not None or main is None:
        return reason
    if main.dtype not in TRITON_DTYPES:
        return f"{kernels} take float32, float16 or bfloat16 inputs, got {dtype_name(main.dtype)}"
    return capability_unsupported(main)


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
