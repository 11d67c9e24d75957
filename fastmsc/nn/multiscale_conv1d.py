"""MultiScaleConv1d: parallel "same" Conv1d branches concatenated on channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..ops.multiscale_conv1d import ACTIVATIONS, multiscale_conv1d
from ._torchscript import NotScriptable


class MultiScaleConv1d(NotScriptable, nn.Module):
    """(B, C_in, T) -> (B, sum(out_channels), T).

    Branches are standard ``nn.Conv1d`` modules in ``self.branches``, so weights load from models that
    hold the convs separately; the forward runs all of them as one fastmsc op.
    """

    def __init__(self, in_channels: int, out_channels: int | Sequence[int], kernel_sizes=(3, 5, 7),
                 activation: str | None = None, bias: bool = True):
        super().__init__()
        kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd positive ints ('same' padding), got {kernel_sizes}")
        if isinstance(out_channels, int):
            out_channels = (out_channels,) * len(kernel_sizes)
        out_channels = tuple(int(c) for c in out_channels)
        if len(out_channels) != len(kernel_sizes) or min(out_channels) < 1:
            raise ValueError(
                f"out_channels must be a positive int or one positive int per kernel size "
                f"({len(kernel_sizes)}), got {out_channels}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of None, 'relu', 'gelu', got {activation!r}")
        self.activation = activation
        self.branches = nn.ModuleList(
            nn.Conv1d(in_channels, c, k, padding=k // 2, bias=bias)
            for c, k in zip(out_channels, kernel_sizes, strict=True)
        )

    @property
    def out_channels(self) -> int:
        return sum(b.out_channels for b in self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [b.weight for b in self.branches]
        biases = None if self.branches[0].bias is None else [b.bias for b in self.branches]
        return multiscale_conv1d(x, weights, biases, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
