"""The reference of fastmsc.attention: softmax(q kᵀ · scale) v, in plain PyTorch written straight from the math
(float64-capable); the oracle of the tests and what the fused path's double backward differentiates. Shapes: see
fastmsc.ops.attention."""

from __future__ import annotations

import torch

from .._checks import compute_dtype, time_mask


def attention_masks(lengths, q):
    """Key mask (B, [1,] 1, T) and query mask (B, [1,] T, 1), True where t < lengths[b]."""
    valid = time_mask(lengths, q.shape[-2])
    if q.dim() == 4:
        valid = valid[:, None]
    return valid[..., None, :], valid[..., :, None]


def zero_padding(lengths, *tensors):
    """The tensors with their steps past the length set to 0: a masked score still multiplies its value
    (0 * NaN = NaN), so padding must not hold non-finite values once it enters the math."""
    valid = time_mask(lengths, tensors[0].shape[-2])
    valid = (valid[:, None] if tensors[0].dim() == 4 else valid)[..., None]
    return tuple(torch.where(valid, t, 0.0) for t in tensors)


def attention_reference(q, k, v, lengths=None, scale=None):
    dtype, work = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    if lengths is not None:
        q, k, v = zero_padding(lengths, q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if lengths is not None:
        # Query rows past the length are masked whole: their zero output gradient would still meet the values in
        # the softmax's backward (0 * inf = NaN) and reach the keys through their probabilities.
        key_valid, query_valid = attention_masks(lengths, q)
        scores = scores.masked_fill(~(key_valid & query_valid), float("-inf"))
    # SDPA's convention for a row whose scores are all -inf (padded rows, or -inf scores): zeros, not softmax's
    # 0/0 = NaN, and zero gradients (so the softmax must not see the -inf row).
    empty = (scores == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(probs, v)
    if lengths is not None:
        out = out.masked_fill(~query_valid, 0.0)
    return out.to(dtype)
