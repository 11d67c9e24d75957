"""The built-in synthetic dataset (``fastmsc train`` without --data or --dataset)."""

from __future__ import annotations

import math

import torch

from ._series import SeriesData


def synthetic(num_train: int = 240, num_test: int = 240, length: int = 96, num_classes: int = 4, channels: int = 1,
              variable_length: bool = False, seed: int = 0) -> tuple[SeriesData, SeriesData]:
    """A built-in dataset whose classes differ in patterns at different time scales.

    Every series is noise plus a slow random-phase wave shared by all classes (a distractor), plus one
    class-specific burst: a windowed oscillation at a random position whose period grows with the class
    (3, 6, 12, ... steps), so telling classes apart needs the short and the long conv kernels and the
    sequence model. Deterministic in ``seed``; train and test come from different draws of one generator.
    With ``variable_length``, lengths are drawn in [length // 2, length] and the rest is zero padding.
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1), ("length", length, 16),
                            ("num_classes", num_classes, 2), ("channels", channels, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    generator = torch.Generator().manual_seed(int(seed))

    def draw(count):
        y = torch.arange(count) % num_classes
        y = y[torch.randperm(count, generator=generator)]
        if variable_length:
            lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        else:
            lengths = torch.full((count,), length)
        t = torch.arange(length, dtype=torch.float64)[None, None, :]
        uniform = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
        x = 0.3 * torch.randn(count, channels, length, generator=generator, dtype=torch.float64)
        x += 0.5 * torch.sin(2 * math.pi * t / length + 2 * math.pi * uniform(count, channels, 1))
        period = (3.0 * 2.0 ** y.double())[:, None, None]
        width = 1.5 * period.clamp_min(4.0)  # a few cycles of the oscillation
        span = lengths.double()[:, None, None]
        centre = width + (span - 2 * width).clamp_min(0) * uniform(count, 1, 1)
        amplitude = 1.0 + 0.5 * uniform(count, channels, 1)
        phase = 2 * math.pi * uniform(count, channels, 1)
        window = torch.exp(-0.5 * ((t - centre) / width) ** 2)
        x += amplitude * window * torch.sin(2 * math.pi * (t - centre) / period + phase)
        x *= (t < span).double()
        return SeriesData(x.float(), y.to(torch.int64), None if not variable_length else lengths.to(torch.int64),
                          tuple(f"scale{k}" for k in range(num_classes)), "synthetic")

    return draw(num_train), draw(num_test)
