"""The reference of fastmsc.max_avg_pool: global max + mean over time, in plain PyTorch written straight from the
math (float64-capable); the oracle of the tests. Shapes: see fastmsc.ops.max_avg_pool."""

from __future__ import annotations

import torch

from .._checks import compute_dtype, time_mask


def max_avg_pool_reference(x, lengths=None):
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    B, T, C = xw.shape
    if lengths is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        count = torch.full((B,), T, dtype=work, device=x.device)
    else:
        valid = time_mask(lengths, T)
        count = lengths.to(work)
    valid = valid[:, :, None]
    with torch.no_grad():
        peak = xw.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
        # A NaN peak means a NaN among the valid steps, and torch.max then picks the first NaN step.
        hit = (xw == peak) | (torch.isnan(xw) & torch.isnan(peak))
        first_peak = (hit & valid).to(torch.int8).argmax(dim=1, keepdim=True)  # first True
    maximum = xw.gather(1, first_peak).squeeze(1)
    mean = xw.masked_fill(~valid, 0.0).sum(dim=1) / count[:, None]
    return torch.cat([maximum, mean], dim=-1).to(x.dtype)
