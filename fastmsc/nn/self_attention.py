"""SelfAttention: q/k/v projections, multi-head scaled-dot-product attention, optional output projection."""

from __future__ import annotations

from torch import nn

from ..ops.attention import attention
from ._torchscript import NotScriptable


class SelfAttention(NotScriptable, nn.Module):
    """forward(x (B, T, E), lengths=None) -> (B, T, E); query rows past lengths[b] are zero."""

    def __init__(self, embed_dim: int, num_heads: int = 1, bias: bool = True, out_proj: bool = False):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.query = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.key = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if out_proj else None

    def _heads(self, t):
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)

    def forward(self, x, lengths=None):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (B, T, {self.embed_dim}), got {tuple(x.shape)}")
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.num_heads == 1:
            out = attention(q, k, v, lengths)
        else:
            out = attention(self._heads(q), self._heads(k), self._heads(v), lengths)
            out = out.transpose(1, 2).reshape(x.shape)
        return out if self.out_proj is None else self.out_proj(out)
