"""MaxAvgPool1d: global max and mean over time, side by side."""

from __future__ import annotations

from torch import nn

from ..ops.max_avg_pool import max_avg_pool
from ._torchscript import NotScriptable


class MaxAvgPool1d(NotScriptable, nn.Module):
    """forward(x (B, T, C), lengths=None) -> (B, 2C) = [max over valid t, mean over valid t]."""

    def forward(self, x, lengths=None):
        return max_avg_pool(x, lengths)
