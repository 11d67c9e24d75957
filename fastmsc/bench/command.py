"""``fastmsc bench``: argument parsing and the run that prints the table, appends the CSV and draws the chart."""

from __future__ import annotations

import argparse
import sys

import torch

from .cases import INPUT_FACTORIES, MODEL, OP_MODES, all_ops
from .harness import BACKEND_CHOICES, FAILED, Options, run_suite
from .report import environment, format_table, matplotlib_missing, plot, write_csv

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
                        help=f"backends to time: {', '.join(BACKEND_CHOICES)} (default: torch fused compile, plus "
                             "reference with --quick; torch is always measured as the baseline)")
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
    parser.add_argument("--csv", default="bench_results.csv", metavar="PATH",
                        help="append one row per measurement to this CSV (default: bench_results.csv)")
    parser.add_argument("--plot", metavar="PATH", help="draw a PNG bar chart of the timings (needs matplotlib)")


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


def run(args) -> int:
    try:
        device = _resolve_device(args.device)
    except ValueError as exc:
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
        backends = ["reference", "torch", "fused", "compile"] if args.quick else ["torch", "fused", "compile"]
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

    options = Options(
        device=device, dtype=DTYPES[args.dtype], backends=tuple(backends),
        repeats=args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS),
        warmup=args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP),
        quick=args.quick, compile_lstm=args.compile_lstm, modes=tuple(modes) if modes else None,
    )
    env = environment(device)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"fastmsc bench on {env['device_name']} ({device}), {args.dtype}, backends {', '.join(backends)}, "
          f"{options.repeats} repeats after {options.warmup} warm-up", file=sys.stderr, flush=True)
    results = run_suite(options, ops)

    timer = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    header = (f"{args.dtype}; median and spread over {options.repeats} timed calls after {options.warmup} warm-up "
              f"({timer}); vs torch = torch median / median; saved = activation bytes kept for backward "
              f"(parameters excluded); max err = worst error vs the float64 reference, relative to the reference's "
              f"largest magnitude" + "".join(f"\nnote: {n}" for n in notes))
    print(format_table(results, env, header))
    try:
        write_csv(args.csv, results, env, options.warmup)
    except (OSError, ValueError) as exc:
        return _fail(f"could not write --csv {args.csv}: {exc}")
    print(f"\nwrote {len(results)} rows to {args.csv}")
    if args.plot:
        bars = plot(args.plot, results, env)
        print(f"wrote {args.plot} ({bars} bars)")
    failed = [r for r in results if r.status in FAILED]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed their reference check or raised: "
              + ", ".join(f"{r.op} {r.mode} [{r.shape}] {r.backend}: {r.status}" for r in failed), file=sys.stderr)
        return 1
    return 0
