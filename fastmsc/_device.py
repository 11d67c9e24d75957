"""Device and dtype facts shared by the dispatch policy, the ops' argument checks and the kernels."""

from __future__ import annotations

import torch


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def compute_capability(device: torch.device) -> int:
    """The CUDA device's compute capability as major * 10 + minor (80 for an A100, 90 for an H100/H200)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32 (a dict lookup: torch.compile traces it without a graph break)."""
    return _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")
