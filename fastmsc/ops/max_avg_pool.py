"""Global max + average pooling over time: x (B, T, C) -> (B, 2C) = cat([max_t x, mean_t x], -1).

With ``lengths`` (B,) only t < lengths[b] counts. The max gradient goes to one position per (b, c):
the first maximal one.

NaN/Inf as torch.max and torch.mean over the valid steps, on every backend: a NaN among a channel's valid
steps makes its max and mean NaN and the max gradient goes to the first NaN step; +Inf is a maximum like any
other, and +Inf with -Inf makes the mean NaN. Values at t >= lengths[b] never reach an output or a gradient.
"""

from __future__ import annotations

import torch

from ..backend import Op, import_failure, register
from ._checks import check_lengths, check_tensor, time_mask
from .reference.max_avg_pool import max_avg_pool_reference

# The fused path. A failed import (no triton, a broken install) is recorded in the op, shown by `fastmsc info`,
# and never raised at `import fastmsc`.
try:
    from ..kernels import max_avg_pool as _kernels
except Exception as exc:
    _kernels, _kernels_error = None, import_failure("fastmsc.kernels.max_avg_pool", exc)
else:
    _kernels_error = None


def max_avg_pool_torch(x, lengths=None):
    if lengths is None:
        maximum = x.max(dim=1).values  # torch.max routes the gradient to the first maximal index
        mean = x.mean(dim=1)
    else:
        invalid = ~time_mask(lengths, x.shape[1])[:, :, None]
        maximum = x.masked_fill(invalid, float("-inf")).max(dim=1).values
        mean = x.masked_fill(invalid, 0.0).sum(dim=1) / lengths[:, None].to(x.dtype)
    return torch.cat([maximum, mean], dim=-1)


OP = register(Op("max_avg_pool", max_avg_pool_reference, max_avg_pool_torch,
                 fused=getattr(_kernels, "fused", None), fused_unsupported=getattr(_kernels, "fused_unsupported", None),
                 load_error=_kernels_error))


def max_avg_pool(x, lengths=None):
    """Args: x (B, T, C); lengths None or (B,) ints in [1, T]. Returns (B, 2C) = [max, mean].

    Empty inputs, as ``torch.cat([x.max(1).values, x.mean(1)], -1)``: B = 0 gives (0, 2C) and C = 0 gives
    (B, 0), with empty gradients. T = 0 raises ValueError on every backend (torch's max raises too).
    """
    check_tensor("x", x, ndim=3)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one time step (T >= 1), got shape {tuple(x.shape)}")
    lengths = check_lengths(lengths, x.shape[0], x.shape[1], x.device)
    impl = OP.select(x.device.type, x=x, lengths=lengths)
    return impl(x, lengths)
