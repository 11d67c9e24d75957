"""The measuring loop: for each case and mode, check every backend against the reference, then time them
round-robin.

Backends (``BACKEND_CHOICES``):

* ``reference``: the float64-capable oracle, run at the benchmark dtype (slow: only in --quick or on request);
* ``torch``: stock PyTorch, the baseline every speed-up is relative to (attention: SDPA with 4-D inputs, its
  row naming the SDPA kernel that ran);
* ``naive``: for ops with a hand-written baseline in ``fastmsc.bench.baselines`` (attention: softmax(QKᵀ)V
  with plain matmuls); no row for other ops;
* ``fused``: the op's fused implementation when ``fastmsc.backend.OPS[op].why_not_fused`` allows it on this
  device and these arguments, else an ``unavailable`` row carrying that reason (for the model: backend
  ``auto``, i.e. fused wherever an op has a fused path);
* ``persistent`` / ``stepwise``: lstm_layer only, the fused LSTM's two implementations each alone (what
  ``FASTMSC_LSTM_IMPL`` selects): the persistent Triton kernel (CUDA) and the compiled extension's per-step
  kernels; ``fused`` is the one ``auto`` picks;
* ``compile``: ``torch.compile`` of the torch backend.

Every backend's result is compared with the reference run in float64 on the same inputs before any timing
(:mod:`fastmsc.bench.checks`); a mismatch is reported with its error and seed and is not timed.

On CUDA every timed call of an op reads an input set the previous call did not (two sets in rotation), and
a write of twice the L2 cache's size runs before it, outside its timing: each call starts from a cold cache,
as in a network where other layers ran in between, and bandwidth-bound ops are not flattered by L2.

Modules: ``rows`` (Options, Result), ``checks`` (tolerances, error measure), ``workloads`` (each backend made
ready per case and mode); this one checks and times them and runs the suite. Their public names are importable
from here too.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence

import torch

from ..dispatch import dtype_name
from .cases import MODEL, Case, default_cases, modes_for
from .checks import CheckOutcome, check_threads, compare, tf32_enabled, tolerance
from .roofline import Peaks, rates, work
from .rows import BACKEND_CHOICES, FAILED, Options, Result
from .timing import time_interleaved
from .workloads import ModelWorkload, OpWorkload, Runner, Unavailable, applies, compile_model, l2_evictor, make_workload


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _failure(backend: str, stage: str, exc: BaseException) -> tuple[str, str]:
    if backend == "compile":
        # torch.compile of stock PyTorch failing is a property of this torch install, not a fastmsc result.
        return "unavailable", f"torch.compile failed while {stage}: {_describe(exc)}"
    return "error", f"raised while {stage}: {_describe(exc)}"


def _checked(workload, backend: str, options: Options) -> tuple[Result, Runner | None]:
    """Resolve ``backend`` on ``workload`` and check it against the reference: the row so far, and the
    runner to time when the check passed (else None, the row saying why)."""
    case = workload.case
    row = Result(case.op, workload.mode, case.shape, dtype_name(options.dtype), backend, "ok")
    try:
        runner = workload.resolve(backend)
    except Exception as exc:
        row.status, row.note = _failure(backend, "setting up", exc)
        return row, None
    if isinstance(runner, Unavailable):
        row.status, row.note = runner
        return row, None
    row.note = runner.note
    try:
        with check_threads(options.device):
            outcome = runner.check()
    except Exception as exc:
        row.status, row.note = _failure(backend, "checking against the reference", exc)
        row.seed = workload.check_seed
        return row, None
    row.max_error, row.worst, row.tolerance = outcome.max_error, outcome.worst, outcome.tolerance
    row.checked_on, row.seed = outcome.checked_on, workload.check_seed
    if not outcome.ok:
        row.status = "mismatch"
        row.note = (f"differs from the float64 reference: {outcome.worst} error {outcome.max_error:.3g} > "
                    f"{outcome.tolerance:.1g} (seed {workload.check_seed}); not timed")
        return row, None
    return row, runner


def _fail(row: Result, stage: str, exc: BaseException) -> None:
    """Mark a checked row failed at ``stage``, its note leading with the failure and keeping the runner's note."""
    row.stats = None
    row.status, note = _failure(row.backend, stage, exc)
    row.note = f"{note}; {row.note}" if row.note else note


def _record_timing(row: Result, runner: Runner, timing) -> None:
    """Put a time_interleaved result (stats and first-call time, or the exception) and the saved bytes in row."""
    if isinstance(timing, Exception):
        _fail(row, "timing", timing)
        return
    row.stats, row.first_call_s = timing
    try:
        row.saved_bytes = runner.saved_bytes()
    except Exception as exc:
        _fail(row, "timing", exc)


def measure_backends(workload, backends: Sequence[str], options: Options) -> list[Result]:
    """Check every backend on ``workload`` against the reference, then time those that agree round-robin
    (one call of each in turn, see fastmsc.bench.timing), so that their ratios share the machine's state."""
    checked = [(backend, *_checked(workload, backend, options))
               for backend in backends if applies(workload.case.op, backend)]
    steps = {}
    for backend, row, runner in checked:
        if runner is None:
            continue
        try:
            steps[backend] = runner.step()
        except Exception as exc:
            _fail(row, "setting up the timed step", exc)
    timings = {}
    if steps:
        timings = time_interleaved(steps, options.device, options.repeats, options.warmup, workload.before_each)
    for backend, row, runner in checked:
        if backend in timings:
            _record_timing(row, runner, timings[backend])
    return [row for _, row, _ in checked]


def measure(workload, backend: str, options: Options) -> Result:
    """Check ``backend`` on ``workload`` against the reference, then (if it agrees) time it alone."""
    return measure_backends(workload, [backend], options)[0]


def add_speedups(rows: list[Result]) -> None:
    """speedup = torch's median / the row's median, within one (case, mode) measured in this run."""
    baseline = next((r for r in rows if r.backend == "torch" and r.status == "ok" and r.stats), None)
    for r in rows:
        if baseline is not None and r.status == "ok" and r.stats:
            r.speedup = baseline.stats.median_ms / r.stats.median_ms


def add_rates(rows: list[Result], case: Case, mode: str, dtype: torch.dtype, peaks: Peaks | None) -> None:
    """Achieved TFLOP/s, GB/s and the roofline fraction of every timed row (see fastmsc.bench.roofline)."""
    counted = work(case, mode, dtype)
    for r in rows:
        if counted is not None and r.status == "ok" and r.stats:
            found = rates(counted, r.stats.median_ms, r.dtype, peaks)
            r.tflops, r.gbps, r.pct_of_peak, r.bound = found.tflops, found.gbps, found.pct_of_peak, found.bound


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(options: Options, ops: Sequence[str], cases: dict[str, list[Case]] | None = None) -> list[Result]:
    """Measure every backend in ``options.backends`` on every case and mode of ``ops``.

    ``cases`` overrides the default cases per op. Returns one Result per (case, mode, backend), in order.
    """
    log = options.log or (lambda line: print(line, file=sys.stderr, flush=True))
    results: list[Result] = []
    start = time.monotonic()
    for op in ops:
        op_cases = (cases or {}).get(op) or default_cases(op, quick=options.quick, device_type=options.device.type)
        for case in op_cases:
            modes = [m for m in modes_for(op) if options.modes is None or m in options.modes or op == MODEL]
            for mode in modes:
                spent = time.monotonic() - start
                if options.time_budget is not None and spent > options.time_budget:
                    rows = _skipped_rows(case, mode, options, f"not started: the time budget of "
                                                             f"{options.time_budget:g} s was spent ({spent:.0f} s)")
                else:
                    workload = make_workload(case, mode, options)
                    rows = measure_backends(workload, options.backends, options)
                    del workload
                    _release(options.device)
                for row in rows:
                    timing = f"{row.stats.median_ms:.3f} ms" if row.stats else row.note
                    log(f"  {op} {mode} [{case.shape}] {row.backend}: {row.status}  {timing}")
                add_speedups(rows)
                add_rates(rows, case, mode, options.dtype, options.peaks)
                results.extend(rows)
                if options.on_rows is not None:
                    options.on_rows(rows)
    return results


def _skipped_rows(case: Case, mode: str, options: Options, why: str) -> list[Result]:
    backends = [b for b in options.backends if applies(case.op, b)]
    return [Result(case.op, mode, case.shape, dtype_name(options.dtype), b, "skipped", note=why) for b in backends]


__all__ = [
    "BACKEND_CHOICES", "FAILED", "CheckOutcome", "ModelWorkload", "OpWorkload", "Options", "Result", "Runner",
    "Unavailable", "add_rates", "add_speedups", "applies", "check_threads", "compare", "compile_model", "dtype_name",
    "l2_evictor", "make_workload", "measure", "measure_backends", "run_suite", "tf32_enabled", "tolerance",
]
