"""Extra baselines some ops are also measured against (backend ``naive`` of ``fastmsc bench``).

Each is what a user might write by hand, with nothing fused: the ``torch`` backend stays the stronger
baseline every speed-up is quoted against.
"""

from __future__ import annotations

import torch

from ..ops.attention import _masks


def naive_attention(q, k, v, lengths=None, scale=None):
    """softmax(q kᵀ · scale) v with two matmuls and a softmax in the input dtype: the (B, [H,] T, T) scores
    are materialised. q, k, v (B, T, D) or (B, H, T, D)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if lengths is not None:
        key_valid, query_valid = _masks(lengths, q)
        scores = scores.masked_fill(~key_valid, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if lengths is not None:
        out = out.masked_fill(~query_valid, 0.0)
    return out


NAIVE = {"attention": naive_attention}
