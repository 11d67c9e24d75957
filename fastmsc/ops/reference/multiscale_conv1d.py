"""The reference of fastmsc.multiscale_conv1d: multi-scale "same" Conv1d + concat, in plain PyTorch written
straight from the math (float64-capable); the oracle of the tests and what the fused path's double backward
differentiates. Shapes: see fastmsc.ops.multiscale_conv1d."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import compute_dtype


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)  # exact erf form
    return y


def multiscale_conv1d_reference(x, weights, biases=None, activation=None):
    """Straight from the definition of cross-correlation: out[b, o, t] = sum_{c, j} w[o, c, j] x[b, c, t + j - k//2]."""
    work = compute_dtype(x.dtype)
    xw = x.to(work)
    outs = []
    for i, w in enumerate(weights):
        k = w.shape[-1]
        padded = F.pad(xw, (k // 2, k // 2))
        windows = padded.unfold(2, k, 1)  # (B, C_in, T, k)
        y = torch.einsum("bctj,ocj->bot", windows, w.to(work))
        if biases is not None and biases[i] is not None:
            y = y + biases[i].to(work)[None, :, None]
        outs.append(activate(y, activation))
    return torch.cat(outs, dim=1).to(x.dtype)
