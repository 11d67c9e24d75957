"""Timing of one benchmark step: warm-up, then repeats timed by CUDA events (GPU) or perf_counter (CPU)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stats:
    """Per-call times in milliseconds over ``repeats`` timed calls: median, quartiles, extremes."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Stats:
        if not samples_ms:
            raise ValueError("need at least one timed call")
        if len(samples_ms) == 1:
            q1 = q3 = samples_ms[0]
        else:
            q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(statistics.median(samples_ms), q1, q3, min(samples_ms), max(samples_ms), len(samples_ms))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device, repeats: int, warmup: int) -> tuple[Stats, float | None]:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns the stats and the wall time in seconds of the first warm-up call (which includes
    torch.compile's compilation and autotuning), or None without warm-up.
    """
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    first_call_s = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        _synchronize(device)
        if i == 0:
            first_call_s = time.perf_counter() - start
    if device.type == "cuda":
        # Events time the GPU work alone; one synchronisation at the end avoids host stalls between calls.
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start_event, end_event in zip(starts, ends, strict=True):
            start_event.record()
            step()
            end_event.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    else:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
    return Stats.from_samples(samples), first_call_s
