"""Device properties read by the dispatch policy and the kernels' capability checks."""

from __future__ import annotations

import torch


@torch.compiler.assume_constant_result  # a device property: torch.compile takes it as a constant, no graph break
def compute_capability(device: torch.device) -> int:
    """The CUDA device's compute capability as major * 10 + minor (80 for an A100, 90 for an H100/H200)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
