"""Scaled-dot-product attention: softmax(q kᵀ · scale) v, non-causal.

Shapes: q, k, v (B, T, D) or (B, H, T, D); scale defaults to 1/sqrt(D). With ``lengths`` (B,), keys
at t >= lengths[b] are ignored and query rows at t >= lengths[b] are zero.

NaN/Inf, on every backend as F.scaled_dot_product_attention on each sequence's valid steps: a NaN in a valid
query row makes that output row NaN, one in a valid key makes every valid row NaN, one in a valid value makes
that column NaN; ±Inf scores give NaN rows (inf - inf in the softmax) and a row whose scores are all -inf gives
zeros, as SDPA does. Values at t >= lengths[b] (queries, keys, values) never reach an output or a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backend import Op, import_failure, register
from ._checks import check_lengths, check_same, check_tensor, time_mask
from .reference.attention import attention_masks, attention_reference, zero_padding

# The fused path. A failed import (no triton, a broken install) is recorded in the op, shown by
# `fastmsc info`, and never raised at `import fastmsc`.
try:
    from ..kernels import attention as _kernels
except Exception as exc:
    _kernels, _kernels_error = None, import_failure("fastmsc.kernels.attention", exc)
else:
    _kernels_error = None


def softmax_attention(q, k, v, lengths=None, scale=None):
    """softmax(q kᵀ · scale) v with two matmuls and a softmax in q's dtype, the (..., T, T) scores materialised:
    what a user writes by hand (the benchmark's naive baseline); the reference adds the handling of non-finite
    padding and of rows whose scores are all -inf."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (..., T, T)
    if lengths is not None:
        key_valid, query_valid = attention_masks(lengths, q)
        scores = scores.masked_fill(~key_valid, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    if lengths is not None:
        out = out.masked_fill(~query_valid, 0.0)
    return out


def _sdpa_arguments(q, k, v, lengths):
    """q, k, v as 4-D (B, H, T, D) views and the key mask: SDPA's flash, memory-efficient and cuDNN kernels take
    only 4-D inputs (3-D ones run its math path, which materialises the T x T scores)."""
    if q.dim() == 3:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    key_valid = None if lengths is None else time_mask(lengths, q.shape[-2])[:, None, None, :]
    return q, k, v, key_valid


def attention_torch(q, k, v, lengths=None, scale=None):
    if lengths is not None:
        q, k, v = zero_padding(lengths, q, k, v)
    q4, k4, v4, key_valid = _sdpa_arguments(q, k, v, lengths)
    # Every row keeps key 0 (lengths >= 1), so no row is fully masked and SDPA gives no NaN.
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=key_valid, scale=scale)
    # PyTorch's CPU flash kernel returns 0 rather than NaN for a query row holding a NaN (its backward does give
    # NaN, as the math path does): adding each row's NaN back costs O(T D), nothing next to the attention itself.
    out = out + torch.where(torch.isnan(q4), q4, 0.0).sum(-1, keepdim=True)
    if lengths is not None:
        out = out.masked_fill(~time_mask(lengths, q.shape[-2])[:, None, :, None], 0.0)
    return out.squeeze(1) if q.dim() == 3 else out


def sdpa_backend(q, k, v, lengths=None, scale=None) -> str:
    """The SDPA kernel ``attention_torch`` runs for these inputs: FLASH_ATTENTION, EFFICIENT_ATTENTION,
    CUDNN_ATTENTION or MATH (PyTorch's own choice, asked through ``torch._fused_sdp_choice``)."""
    q4, k4, v4, key_valid = _sdpa_arguments(q, k, v, lengths)
    try:
        choice = torch._fused_sdp_choice(q4, k4, v4, attn_mask=key_valid, dropout_p=0.0, is_causal=False, scale=scale)
        return torch.nn.attention.SDPBackend(choice).name
    except Exception as exc:  # a private API: its absence must not break a benchmark
        return f"unknown ({type(exc).__name__})"


OP = register(Op("attention", attention_reference, attention_torch,
                 fused=getattr(_kernels, "fused", None), fused_unsupported=getattr(_kernels, "fused_unsupported", None),
                 load_error=_kernels_error, fused_expected_slower=getattr(_kernels, "expected_slower", None)))


def attention(q, k, v, lengths=None, scale=None):
    """Args: q, k, v (B, T, D) or (B, H, T, D); lengths None or (B,); scale None (1/sqrt(D)) or a float.

    Returns the same shape as q.

    Empty inputs: B = 0 (or H = 0) gives an empty output and empty gradients, as
    F.scaled_dot_product_attention does. T = 0 and D = 0 raise ValueError on every backend (SDPA returns an
    empty result; here an empty sequence or head dimension is taken as a caller's mistake, and lengths need
    T >= 1).
    """
    check_tensor("q", q, ndim=(3, 4))
    check_tensor("k", k, ndim=(3, 4))
    check_tensor("v", v, ndim=(3, 4))
    for name, t in (("k", k), ("v", v)):
        check_same(name, t, "q", q)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)} (self-attention), got {tuple(t.shape)}")
    if q.shape[-2] == 0 or q.shape[-1] == 0:
        raise ValueError(f"q must have T >= 1 and D >= 1, got shape {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be None or a finite float, got {scale!r}")
    lengths = check_lengths(lengths, q.shape[0], q.shape[-2], q.device)
    impl = OP.select(q.device.type, q=q, k=k, v=v, lengths=lengths, scale=scale)
    return impl(q, k, v, lengths, float(scale))
