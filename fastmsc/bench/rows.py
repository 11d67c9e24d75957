"""What a benchmark run is asked to do (:class:`Options`) and what it reports (:class:`Result`, one row of the
table and of the CSV), with the backends' names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .roofline import Peaks
from .timing import Stats

BACKEND_CHOICES = ("reference", "torch", "naive", "fused", "persistent", "stepwise", "compile")
# The fused LSTM's two implementations, each timed alone (FASTMSC_LSTM_IMPL); "fused" is what auto picks.
LSTM_IMPL_BACKENDS = ("persistent", "stepwise")
FAILED = ("mismatch", "error")


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype = torch.float32
    backends: tuple[str, ...] = ("torch", "fused", "compile")
    repeats: int = 10
    warmup: int = 3
    quick: bool = False
    compile_lstm: bool = False
    modes: tuple[str, ...] | None = None  # None: every mode of each op
    log: Callable[[str], None] | None = None
    peaks: Peaks | None = None  # measured ceilings for each row's achieved rate and % of peak
    time_budget: float | None = None  # seconds: cases that would start later become skipped rows
    on_rows: Callable[[list[Result]], None] | None = None  # called with each case's rows once measured


@dataclass
class Result:
    """One row of the table and of the CSV."""

    op: str
    mode: str
    shape: str
    dtype: str
    backend: str
    status: str  # ok | mismatch | error | unavailable | skipped
    stats: Stats | None = None
    speedup: float | None = None  # torch median / this median, both from this run
    saved_bytes: int | None = None
    max_error: float | None = None
    tolerance: float | None = None
    worst: str = ""
    checked_on: str = ""
    seed: int | None = None
    first_call_s: float | None = None
    note: str = ""
    tflops: float | None = None  # achieved, from fastmsc.bench.roofline's counts over the median
    gbps: float | None = None
    pct_of_peak: float | None = None  # roofline fraction against the ceilings measured in the same run
    bound: str = ""  # mem | math: which ceiling the roofline fraction is taken against
