"""``fastmsc bench``: argument parsing and the run that prints the table, appends the CSV and draws the chart.

The measuring itself is :mod:`fastmsc.bench`'s; see that package for what is checked and timed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .. import dispatch
from .._device import compute_capability
from ..bench.cases import INPUT_FACTORIES, MODEL, OP_MODES, all_ops, lstm_grid_cases
from ..bench.harness import BACKEND_CHOICES, FAILED, Options, run_suite
from ..bench.report import check_csv, environment, format_table, matplotlib_missing, plot, read_csv, write_csv
from ..bench.roofline import measure_peaks

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_REPEATS, DEFAULT_WARMUP = 10, 3
QUICK_REPEATS, QUICK_WARMUP = 3, 1


def _names(values: list[str] | None) -> list[str] | None:
    """``--ops a b`` and ``--ops a,b`` both give [a, b]."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repeats, reference backend included, torch.compile skipped "
                             "(under a minute on 2 CPU cores)")
    parser.add_argument("--ops", nargs="+", metavar="OP",
                        help=f"ops to run (default: all): {', '.join(all_ops())}")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND",
                        help=f"backends to time: {', '.join(BACKEND_CHOICES)} (default: torch naive fused persistent "
                             "stepwise compile, plus reference with --quick; torch is always measured as the "
                             "baseline; naive only where an op has a naive baseline: attention; persistent and "
                             "stepwise, the fused LSTM's two implementations (FASTMSC_LSTM_IMPL), only for "
                             "lstm_layer)")
    parser.add_argument("--modes", nargs="+", metavar="MODE",
                        help=f"op modes: {', '.join(OP_MODES)} (default: both; the model always runs its train step)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--repeats", type=int,
                        help=f"timed calls per measurement (default {DEFAULT_REPEATS}; {QUICK_REPEATS} with --quick)")
    parser.add_argument("--warmup", type=int,
                        help=f"untimed calls first (default {DEFAULT_WARMUP}; {QUICK_WARMUP} with --quick)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (torch.set_num_threads; default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile backend")
    parser.add_argument("--compile-lstm", action="store_true",
                        help="let torch.compile compile the LSTM even where it unrolls every time step "
                             "(compile time grows with T)")
    parser.add_argument("--lstm-grid", action="store_true",
                        help="lstm_layer on the grid B 8/32/64 x T 150/512/1000 x H 64/128/256 instead of its default "
                             "shapes (27 cases: minutes on a GPU); with --ops lstm_layer it times only that")
    parser.add_argument("--csv", default="bench_results.csv", metavar="PATH",
                        help="append one row per measurement to this CSV (default: bench_results.csv)")
    parser.add_argument("--plot", metavar="PATH", help="draw a PNG bar chart of the timings (needs matplotlib)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="cases that would start after SECONDS become 'skipped' rows (the run ends on its own)")
    parser.add_argument("--write-dispatch", nargs="?", const=str(dispatch.TABLE_PATH), metavar="PATH",
                        help="CUDA only: merge the measured verdicts (fused vs torch per op; persistent vs "
                             "stepwise for the LSTM) into the dispatch table that backend 'auto' reads "
                             "(default PATH: the package's own, "
                             f"{dispatch.TABLE_PATH.name}; see fastmsc.dispatch)")
    parser.add_argument("--table-from", nargs="+", metavar="CSV",
                        help="measure nothing: print the table of the rows in these CSV files (written by --csv)")


def _fail(message: str) -> int:
    print(f"fastmsc bench: error: {message}", file=sys.stderr)
    return 2


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def _print_tables(paths: list[str]) -> int:
    """The table of every run (one per timestamp and device) found in the CSV files ``paths``."""
    runs: dict[tuple[str, str], tuple[dict, list]] = {}
    for path in paths:
        try:
            rows = read_csv(path)
        except (OSError, ValueError, KeyError) as exc:
            return _fail(f"--table-from {path} cannot be read as a fastmsc bench CSV ({type(exc).__name__}: {exc})")
        for env, result in rows:
            runs.setdefault((env["timestamp"], env["device"]), (env, []))[1].append(result)
    if not runs:
        print(f"no benchmark rows in {', '.join(paths)}")
        return 0
    print("\n\n".join(format_table(results, env, f"{results[0].dtype}; rows from {', '.join(paths)}")
                       for env, results in runs.values()))
    return 0


def _dispatch_rows(results, device: torch.device, env: dict) -> list[dict]:
    """One row per (op case, mode) with a timed baseline, for fastmsc.dispatch.verdicts: fused vs torch for every
    op, and for lstm_layer also persistent vs stepwise (the pseudo-op dispatch.LSTM_IMPL_OP)."""
    capability = compute_capability(device)
    versions = f"fastmsc {env['fastmsc']}, torch {env['torch']}, triton {env['triton'] or 'absent'}"
    by_case: dict[tuple, dict] = {}
    for r in results:
        if r.op == MODEL:
            continue
        by_case.setdefault((r.op, r.mode, r.shape, r.dtype), {})[r.backend] = r
    rows = []
    for (op, mode, shape, dtype), backends in by_case.items():
        dims = dict(part.split("=") for part in shape.split())
        main = {"multiscale_conv1d": ("B", "C_in", "T"), "lstm_layer": ("B", "T", "I"), "attention": ("B", "T", "E"),
                "max_avg_pool": ("B", "T", "C")}[op]
        numel = 1
        for name in main:
            numel *= int(dims[name])
        verdict_ops = [op] + ([dispatch.LSTM_IMPL_OP] if op == "lstm_layer" else [])
        for verdict_op in verdict_ops:
            candidate, baseline = dispatch.choices_for(verdict_op)
            baseline_row, candidate_row = backends.get(baseline), backends.get(candidate)
            if baseline_row is None or baseline_row.stats is None or candidate_row is None or candidate_row.status in (
                    "unavailable", "skipped"):
                continue
            rows.append({"op": verdict_op, "mode": mode, "dtype": dtype, "shape": shape, "numel": numel,
                         "capability": capability, "gpu": torch.cuda.get_device_name(device),
                         "measured": env["timestamp"], "versions": versions,
                         "times_ms": {baseline: baseline_row.stats.median_ms,
                                      candidate: candidate_row.stats.median_ms if candidate_row.stats else None}})
    return rows


def run(args) -> int:
    if args.table_from:
        return _print_tables(args.table_from)
    try:
        device = _resolve_device(args.device)
    except ValueError as exc:
        return _fail(str(exc))
    if args.write_dispatch and device.type != "cuda":
        return _fail(f"--write-dispatch records verdicts per GPU compute capability, so it needs --device cuda "
                     f"(this run is on {device})")
    if args.time_budget is not None and args.time_budget <= 0:
        return _fail(f"--time-budget must be > 0 seconds, got {args.time_budget:g}")
    try:
        check_csv(args.csv)
        if args.write_dispatch:
            dispatch.read_table(args.write_dispatch)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    if args.plot and (missing := matplotlib_missing()):
        return _fail(missing)
    for flag, value, low in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            return _fail(f"{flag} must be >= {low}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)

    known_ops = [op for op in all_ops() if op in INPUT_FACTORIES or op == MODEL]
    ops = _names(args.ops) or known_ops
    unknown = [op for op in ops if op not in known_ops]
    if unknown:
        return _fail(f"--ops got {', '.join(unknown)}; valid ops are {', '.join(known_ops)}")
    modes = _names(args.modes)
    if modes and (bad := [m for m in modes if m not in OP_MODES]):
        return _fail(f"--modes got {', '.join(bad)}; valid modes are {', '.join(OP_MODES)}")
    requested = _names(args.backends)
    if requested and (bad := [b for b in requested if b not in BACKEND_CHOICES]):
        return _fail(f"--backends got {', '.join(bad)}; valid backends are {', '.join(BACKEND_CHOICES)}")

    notes = [f"not benchmarked: {op} (no input factory in fastmsc.bench.cases)"
             for op in all_ops() if op not in known_ops]
    if requested:
        backends = list(dict.fromkeys(requested))
        if "torch" not in backends:
            backends.insert(0, "torch")
            notes.append("torch added to --backends: it is the baseline of every speed-up")
    else:
        backends = (["reference"] if args.quick else []) + ["torch", "naive", "fused", "persistent", "stepwise",
                                                             "compile"]
    if "compile" in backends and args.no_compile:
        backends.remove("compile")
        notes.append("torch.compile skipped: --no-compile")
    elif "compile" in backends and args.quick and not (requested and "compile" in requested):
        backends.remove("compile")
        notes.append("torch.compile skipped in --quick: compiling takes 10 s or more per shape and mode on CPU "
                      "(pass --backends ... compile to include it)")
    if "reference" not in backends:
        notes.append("reference backend not timed (too slow at full size; --backends reference adds it); every "
                     "timed backend is still checked against it in float64 first")

    dtype = DTYPES[args.dtype]
    peaks = measure_peaks(device, [dtype])
    env = environment(device, peaks, dtype)
    written: list = []

    def append_rows(rows):  # after every case, so a run stopped early keeps what it measured
        write_csv(args.csv, rows, env, options.warmup)
        written.extend(rows)

    options = Options(
        device=device, dtype=dtype, backends=tuple(backends),
        repeats=args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS),
        warmup=args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
        quick=args.quick, compile_lstm=args.compile_lstm, modes=tuple(modes) if modes else None,
        peaks=peaks, time_budget=args.time_budget, on_rows=append_rows,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"fastmsc bench on {env['device_name']} ({device}), {args.dtype}, backends {', '.join(backends)}, "
          f"{options.repeats} repeats after {options.warmup} warm-up; {peaks.describe()}", file=sys.stderr, flush=True)
    try:
        results = run_suite(options, ops, {"lstm_layer": lstm_grid_cases()} if args.lstm_grid else None)
    except (OSError, ValueError) as exc:
        return _fail(f"could not write --csv {args.csv}: {exc}")

    timer = "CUDA events, L2 evicted and inputs rotated between op calls" if device.type == "cuda" \
        else "time.perf_counter"
    header = (f"{args.dtype}; median and spread over {options.repeats} timed calls after {options.warmup} warm-up "
              f"({timer}); vs torch = torch median / median; TFLOP/s, GB/s = the op's FLOPs and fewest bytes over "
              f"the median; % peak = roofline fraction against the ceilings above (mem: copy bandwidth, math: "
              f"matmul rate); saved = activation bytes kept for backward (parameters excluded); max err = worst "
              f"error vs the float64 reference, relative to the reference's largest magnitude"
              + "".join(f"\nnote: {n}" for n in notes))
    print(format_table(results, env, header))
    print(f"\nwrote {len(written)} rows to {args.csv}")
    if args.write_dispatch:
        entries = dispatch.verdicts(_dispatch_rows(results, device, env))
        dispatch.write_table(args.write_dispatch, entries)
        baselines = sum(e.choice == dispatch.choices_for(e.op)[1] for e in entries)
        print(f"wrote {len(entries)} dispatch verdicts ({baselines} torch or stepwise) to {args.write_dispatch}")
    if args.plot:
        bars = plot(args.plot, results, env)
        print(f"wrote {args.plot} ({bars} bars)")
    failed = [r for r in results if r.status in FAILED]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed their reference check or raised: "
              + ", ".join(f"{r.op} {r.mode} [{r.shape}] {r.backend}: {r.status}" for r in failed), file=sys.stderr)
        return 1
    return 0
