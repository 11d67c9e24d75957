"""The dataset object every loader returns (:class:`SeriesData`), its checks, and per-series normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

STORAGE_DTYPE = np.float32  # SeriesData.x of every loader


class DataFormatError(ValueError):
    """A malformed data file; ``path`` and ``line`` (1-based, None for whole-file problems) say where."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line, self.reason = Path(path), line, message
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class SeriesData:
    """A labelled set of series: x (N, C, T), y (N,) int64 in 0..K-1, lengths (N,) int64 or None, the K
    ``classes``; see :mod:`fastmsc.data` for what the loaders put in them."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or self.x.dim() != 3:
            got = tuple(self.x.shape) if isinstance(self.x, torch.Tensor) else type(self.x).__name__
            raise ValueError(f"x must be a (N, C, T) tensor, got {got}")
        n = self.x.shape[0]
        if not isinstance(self.y, torch.Tensor) or self.y.shape != (n,) or self.y.dtype != torch.int64:
            got = (tuple(self.y.shape), self.y.dtype) if isinstance(self.y, torch.Tensor) else type(self.y).__name__
            raise ValueError(f"y must be an int64 tensor of shape ({n},) (one label per series), got {got}")
        if self.lengths is not None and (self.lengths.shape != (n,) or self.lengths.dtype != torch.int64):
            raise ValueError(f"lengths must be None or an int64 tensor of shape ({n},), "
                             f"got {tuple(self.lengths.shape)} {self.lengths.dtype}")
        if n and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise ValueError(f"y must hold class indices in [0, {len(self.classes) - 1}] "
                             f"({len(self.classes)} classes), got values in [{int(self.y.min())}, {int(self.y.max())}]")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_channels(self) -> int:
        return self.x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> torch.Tensor:
        """(K,) int64: how many series carry each class."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def series_lengths(self) -> torch.Tensor:
        """(N,) int64 valid steps per series (T for all when ``lengths`` is None)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((len(self),), self.x.shape[2], dtype=torch.int64)


def from_tensors(x, y, lengths=None, classes: Sequence[str] | None = None, name: str = "") -> SeriesData:
    """Wrap tensors x (N, C, T), y (N,) labels 0..K-1 and optional lengths (N,) as a :class:`SeriesData`.

    ``classes`` defaults to the label numbers as strings, K = max(y) + 1.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if lengths is not None:
        lengths = torch.as_tensor(lengths).to(torch.int64)
    if classes is None:
        classes = tuple(str(k) for k in range(int(y.max()) + 1 if y.numel() else 0))
    return SeriesData(x, y, lengths, tuple(classes), name)


def znormalise(x: torch.Tensor, lengths: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """x (N, C, T) -> same shape and dtype: per series and channel, the mean subtracted and the result divided
    by the standard deviation, both over the valid steps (``lengths`` (N,), None: all T). Computed in float64.

    A constant channel (std < eps) becomes zeros. Padding becomes zero.
    """
    steps = torch.arange(x.shape[2], device=x.device)
    lengths = torch.full((x.shape[0],), x.shape[2], device=x.device) if lengths is None else lengths.to(x.device)
    valid = (steps[None, :] < lengths[:, None])[:, None, :]  # (N, 1, T)
    # where, not a product with the mask: whatever the padding holds (NaN included) must not reach the result
    wide = torch.where(valid, x.double(), 0.0)
    count = lengths.double()[:, None, None]
    mean = wide.sum(-1, keepdim=True) / count
    var = torch.where(valid, (wide - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
    std = var.sqrt()
    normalised = torch.where(std < eps, torch.zeros_like(wide), (wide - mean) / std.clamp_min(eps))
    return torch.where(valid, normalised, 0.0).to(x.dtype)


def znormalise_series(data: SeriesData, eps: float = 1e-8) -> SeriesData:
    """``data`` with x z-normalised per series and channel over the valid steps (:func:`znormalise`)."""
    return replace(data, x=znormalise(data.x, data.series_lengths(), eps).float())
