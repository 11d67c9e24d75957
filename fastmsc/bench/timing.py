"""Timing of benchmark steps: warm-up, then repeats timed by CUDA events (GPU) or perf_counter (CPU).

Several steps (one per backend) are timed round-robin, one call of each in turn, so that a change of the
machine's speed during the run (clock boost, another process, thermal state) falls on every backend alike
and the ratios between them stay fair."""

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


def time_interleaved(steps: dict[str, Callable[[], object]], device, repeats: int, warmup: int,
                     before_each: Callable[[], object] | None = None,
                     ) -> dict[str, tuple[Stats, float | None] | Exception]:
    """Warm up and time every step of ``steps`` round-robin: ``warmup`` untimed rounds, then ``repeats``
    timed rounds, each round calling every step once in the given order. ``before_each`` (e.g. a write
    that evicts the GPU's L2 cache) runs before every timed call, outside its timing.

    Returns, per name, the stats and the wall time in seconds of its first warm-up call (which includes
    torch.compile's compilation and autotuning; None without warm-up), or the exception the step raised;
    a step that raises leaves the rotation and the others go on.
    """
    device = torch.device(device)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    live = dict(steps)
    results: dict[str, tuple[Stats, float | None] | Exception] = {}
    first_call_s: dict[str, float] = {}

    def call(name: str, step: Callable[[], object]) -> bool:
        try:
            step()
            return True
        except Exception as exc:  # a backend failing must not stop the others' measurement
            results[name] = exc
            del live[name]
            return False

    for i in range(warmup):
        for name, step in list(live.items()):
            start = time.perf_counter()
            if call(name, step):
                _synchronize(device)
                if i == 0:
                    first_call_s[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in live}
    if device.type == "cuda":
        # Events time the GPU work alone; one synchronisation at the end avoids host stalls between calls.
        events: dict[str, list] = {name: [] for name in live}
        for _ in range(repeats):
            for name, step in list(live.items()):
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if before_each is not None:
                    before_each()
                start_event.record()
                if call(name, step):
                    end_event.record()
                    events[name].append((start_event, end_event))
        torch.cuda.synchronize(device)
        for name in live:
            samples[name] = [s.elapsed_time(e) for s, e in events[name]]
    else:
        for _ in range(repeats):
            for name, step in list(live.items()):
                if before_each is not None:
                    before_each()
                start = time.perf_counter()
                if call(name, step):
                    samples[name].append((time.perf_counter() - start) * 1e3)
    for name in live:
        results[name] = (Stats.from_samples(samples[name]), first_call_s.get(name))
    return {name: results[name] for name in steps}


def time_step(step: Callable[[], object], device, repeats: int, warmup: int) -> tuple[Stats, float | None]:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times timed; returns the stats and the wall
    time of the first warm-up call (see :func:`time_interleaved`). An exception of the step propagates."""
    result = time_interleaved({"step": step}, device, repeats, warmup)["step"]
    if isinstance(result, Exception):
        raise result
    return result
