"""CPU speed of fastmsc's LSTM against torch.nn.LSTM (oneDNN) over the shapes users meet, with a summary and a CSV.

The grid: batch B ∈ {1, 8, 32, 128}, steps T ∈ {24, 64, 150, 512, 1000}, input = hidden size ∈ {32, 64, 100, 128,
256}, uni- and bidirectional, batch_first and time-major input, 1 and 2 threads; each case is timed training (forward
+ backward of out, h_n and c_n) and inference (no_grad), float32 (and bfloat16 with --dtypes where the CPU has native
bf16). One layer, as client models stack them. Both modules hold the same weights; their calls alternate
(``fastmsc.bench.timing.time_interleaved``), so load changes fall on both alike. The ratio is torch's median over
fastmsc's: above 1, fastmsc is faster.

The whole grid is 800 cases, hours on one core at the large end: ``--sample N`` times N cases drawn at random
(``--seed``), ``--budget-s`` stops starting new cases after that many seconds, ``--only B=128 T=24`` restricts
dimensions. ``--backend auto`` times fastmsc as ``auto`` dispatches it (the CPU rule of fastmsc.dispatch included),
``fused`` (default) the extension alone.

    python bench/lstm_cpu_grid.py --sample 60 --csv lstm_cpu_grid.csv
    python bench/lstm_cpu_grid.py --sample 0 --write-table --from-csv lstm_cpu_grid.csv   # auto's CPU rule
    python bench/lstm_cpu_grid.py --only B=128 T=24 H=32 --threads 2
    python bench/lstm_cpu_grid.py --refresh-below 3   # re-time the record's fast cases after a per-call change
    python bench/lstm_cpu_grid.py --refresh-below inf --dtypes bfloat16   # all its bf16 cases, after a bf16 change

Printed: each case as it ends, then the geometric-mean speed-up per mode, the worst cases, and the geometric mean
per value of each dimension (the trends).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastmsc
from fastmsc.bench.timing import time_interleaved
from fastmsc.kernels import lstm_cpu_measured
from fastmsc.nn import LSTM

GRID = {
    "B": (1, 8, 32, 128),
    "T": (24, 64, 150, 512, 1000),
    "H": (32, 64, 100, 128, 256),
    "D": (1, 2),
    "layout": ("batch_first", "time_major"),
    "threads": (1, 2),
}
MODES = ("train", "infer")


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int  # input size = hidden size
    D: int  # directions
    layout: str
    threads: int
    dtype: str = "float32"

    def flops(self) -> float:
        """Multiply-adds of one forward (x and h products), for ordering cases by cost."""
        return 8.0 * self.B * self.T * self.D * self.H * (2 * self.H)

    def label(self) -> str:
        return (f"B={self.B} T={self.T} H={self.H} {'bi' if self.D == 2 else 'uni'} {self.layout} "
                f"{self.threads}t {self.dtype}")


@dataclass
class Row:
    case: Case
    mode: str
    torch_ms: float
    fastmsc_ms: float

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.fastmsc_ms


def native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cases(only: dict[str, set], dtypes: list[str]) -> list[Case]:
    names = list(GRID)
    values = [[v for v in GRID[name] if name not in only or str(v) in only[name]] for name in names]
    return [Case(*combo, dtype=dtype) for combo in itertools.product(*values) for dtype in dtypes]


def training_step(model, x):
    """One training step of an LSTM module: forward, then the backward of out, h_n and c_n."""
    def step():
        out, (h, c) = model(x)
        (out.sum() + h.sum() + c.sum()).backward()
    return step


def inference_step(model, x):
    def step():
        with torch.no_grad():
            model(x)
    return step


def measure(case: Case, reps: int, min_seconds: float, backend: str) -> list[Row]:
    torch.set_num_threads(case.threads)
    dtype = getattr(torch, case.dtype)
    batch_first = case.layout == "batch_first"
    reference = torch.nn.LSTM(case.H, case.H, batch_first=batch_first, bidirectional=case.D == 2).to(dtype)
    fast = LSTM(case.H, case.H, batch_first=batch_first, bidirectional=case.D == 2).to(dtype)
    fast.load_state_dict(reference.state_dict())
    shape = (case.B, case.T, case.H) if batch_first else (case.T, case.B, case.H)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    rows = []
    with fastmsc.use_backend(backend):
        for mode, make in (("train", training_step), ("infer", inference_step)):
            steps = {"torch": make(reference, x), "fastmsc": make(fast, x)}
            start = time.perf_counter()
            time_interleaved(steps, "cpu", repeats=1, warmup=1)  # first calls: allocations, oneDNN primitives
            one_round = max(time.perf_counter() - start, 1e-6) / 2
            repeats = max(3, min(reps, math.ceil(min_seconds / one_round)))
            timed = time_interleaved(steps, "cpu", repeats=repeats, warmup=0)
            for name, result in timed.items():
                if isinstance(result, Exception):
                    raise RuntimeError(f"{case.label()} {mode}: {name} raised {result!r}") from result
            rows.append(Row(case, mode, timed["torch"][0].median_ms, timed["fastmsc"][0].median_ms))
    return rows


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def case_line(case_rows: list[Row]) -> str:
    """One case's modes as timed: ratio (torch / fastmsc ms) each, then the case."""
    return ("  ".join(f"{r.mode} {r.ratio:5.2f}x ({r.torch_ms:8.3f} / {r.fastmsc_ms:8.3f} ms)" for r in case_rows)
            + f"  {case_rows[0].case.label()}")


def summary(rows: list[Row]) -> str:
    lines = []
    for mode in MODES:
        ratios = [r.ratio for r in rows if r.mode == mode]
        if ratios:
            lines.append(f"{mode}: geomean {geomean(ratios):.2f}x over {len(ratios)} cases, worst {min(ratios):.2f}x, "
                         f"best {max(ratios):.2f}x, {sum(r < 1 for r in ratios)} below 1.0x")
    worst = sorted(rows, key=lambda r: r.ratio)[:8]
    lines.append("worst cases:")
    lines += [f"  {r.ratio:5.2f}x  {r.mode:<5} {r.case.label()}  (torch {r.torch_ms:.3g} ms, fastmsc "
              f"{r.fastmsc_ms:.3g} ms)" for r in worst]
    lines.append("geomean per dimension (train / infer):")
    for name in (*GRID, "dtype"):
        parts = []
        for value in sorted({getattr(r.case, name) for r in rows}, key=str):
            per_mode = [geomean(r.ratio for r in rows if r.mode == mode and getattr(r.case, name) == value)
                        for mode in MODES]
            parts.append(f"{value}: {per_mode[0]:.2f}/{per_mode[1]:.2f}")
        lines.append(f"  {name:<8} " + "   ".join(parts))
    return "\n".join(lines)


def write_csv(path: str, rows: list[Row], backend: str) -> None:
    fields = [*asdict(rows[0].case), "mode", "torch_ms", "fastmsc_ms", "ratio", "backend", "cpu", "torch", "cpu_class"]
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r.case), "mode": r.mode, "torch_ms": f"{r.torch_ms:.4f}",
                             "fastmsc_ms": f"{r.fastmsc_ms:.4f}", "ratio": f"{r.ratio:.4f}", "backend": backend,
                             "cpu": cpu_name(), "torch": torch.__version__,
                             "cpu_class": torch.backends.cpu.get_cpu_capability()})


def read_csv(paths: list[str]) -> list[Row]:
    """The fused-backend rows of earlier runs' CSVs taken on this CPU class (rows without a class: this one)."""
    here = torch.backends.cpu.get_cpu_capability()
    rows = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["backend"] != "fused" or r.get("cpu_class", here) != here:
                    continue
                case = Case(int(r["B"]), int(r["T"]), int(r["H"]), int(r["D"]), r["layout"], int(r["threads"]),
                            r["dtype"])
                rows.append(Row(case, r["mode"], float(r["torch_ms"]), float(r["fastmsc_ms"])))
    return rows


def write_table(rows: list[Row], command: str, path) -> None:
    """This CPU class's record in the table at path (fastmsc/kernels/lstm_cpu_measured.json: auto's CPU rule): these
    rows replace it."""
    records = lstm_cpu_measured.read(path)
    cpu_class = torch.backends.cpu.get_cpu_capability()
    cases = tuple(lstm_cpu_measured.Case(r.case.dtype, r.mode, r.case.threads, r.case.B, r.case.T, r.case.H, r.case.D,
                                         round(r.torch_ms, 4), round(r.fastmsc_ms, 4)) for r in rows)
    records[cpu_class] = lstm_cpu_measured.ClassRecord(cpu=cpu_name(), torch=torch.__version__,
                                                       measured=time.strftime("%Y-%m-%dT%H:%M:%S"), command=command,
                                                       cases=cases)
    lstm_cpu_measured.write(records, path)
    print(f"wrote {len(cases)} measured cases for CPU class {cpu_class} to {path}")


def case_key(c) -> tuple:
    """What identifies a recorded case (the record keeps no layout): of a record's Case or a Row's Case."""
    return (c.dtype, c.threads, c.B, c.T, c.H, c.D)


def recorded_rows(record, dropped: set) -> list[Row]:
    """The record's cases as rows (batch first), but those whose (case_key, mode) is in ``dropped``."""
    return [Row(Case(c.B, c.T, c.H, c.D, "batch_first", c.threads, c.dtype), c.mode, c.torch_ms, c.fastmsc_ms)
            for c in record.cases if (case_key(c), c.mode) not in dropped]


def refresh(table: Path, below_ms: float, dtypes: list[str] | None, only: dict[str, set], reps: int,
            min_seconds: float, argv) -> int:
    """--refresh-below: the record's cases under ``below_ms`` (of ``dtypes``, or any, and within ``only``, --only's
    restrictions) timed again (batch-first: the record keeps no layout), the others kept as they are."""
    cpu_class = torch.backends.cpu.get_cpu_capability()
    record = lstm_cpu_measured.read(table).get(cpu_class)
    if record is None:
        raise SystemExit(f"{table} holds no record for CPU class {cpu_class} to refresh")

    def chosen(c):
        return (c.torch_ms < below_ms and (dtypes is None or c.dtype in dtypes)
                and all(str(getattr(c, name)) in values for name, values in only.items() if name != "layout"))

    stale = {case_key(c) for c in record.cases if chosen(c)}
    kept = recorded_rows(record, {(key, mode) for key in stale for mode in ("train", "infer")})
    print(f"re-timing {len(stale)} of the record's {len({case_key(c) for c in record.cases})} cases (torch under "
          f"{below_ms} ms{'' if dtypes is None else ', ' + ' and '.join(dtypes)})")
    rows = []
    for case in sorted((Case(B, T, H, D, "batch_first", threads, dtype) for dtype, threads, B, T, H, D in stale),
                       key=Case.flops):
        case_rows = measure(case, reps, min_seconds, "fused")
        rows += case_rows
        print(case_line(case_rows), flush=True)
    if rows:
        print(summary(rows))
    command = f"{record.command}; then python bench/lstm_cpu_grid.py {' '.join(argv or sys.argv[1:])}"
    write_table(rows + kept, command, table)
    return 0


def parse_only(items: list[str]) -> dict[str, set]:
    only = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in GRID or not values:
            raise SystemExit(f"--only takes NAME=V1,V2 with NAME one of {', '.join(GRID)}; got {item!r}")
        only[name] = set(values.split(","))
    return only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="time this many cases drawn at random from the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME=V1,V2",
                        help=f"restrict dimensions ({', '.join(GRID)})")
    parser.add_argument("--dtypes", help="comma-separated (default float32; with --refresh-below, every dtype); "
                                         "bfloat16 needs native CPU support")
    parser.add_argument("--backend", default="fused", choices=("fused", "auto"))
    parser.add_argument("--reps", type=int, default=15, help="most timed rounds per case and mode")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed rounds continue until this much time")
    parser.add_argument("--budget-s", type=float, help="start no case after this many seconds")
    parser.add_argument("--csv", help="append one row per case and mode")
    parser.add_argument("--write-table", action="store_true",
                        help="record the fused rows as this CPU class's measurements for auto's CPU rule "
                             "(fastmsc/kernels/lstm_cpu_measured.json), with those of --from-csv")
    parser.add_argument("--from-csv", nargs="+", default=[], metavar="CSV",
                        help="with --write-table: also the rows of earlier runs' CSVs (this CPU class's)")
    parser.add_argument("--merge", action="store_true",
                        help="with --write-table: add the cases to this CPU class's record, replacing those timed "
                             "again (per mode), instead of replacing the record")
    parser.add_argument("--table", type=Path, default=lstm_cpu_measured.TABLE_PATH,
                        help="the table --write-table writes (default: the one fastmsc reads)")
    parser.add_argument("--refresh-below", type=float, metavar="MS",
                        help="re-time the cases of this CPU class's record whose torch time was under MS in either "
                             "mode (after a change to the per-call cost, say; inf: all of them), of --dtypes and "
                             "within --only where given, keep its others, write it back")
    args = parser.parse_args(argv)
    if args.refresh_below is not None:
        dtypes = args.dtypes.split(",") if args.dtypes else None
        return refresh(args.table, args.refresh_below, dtypes, parse_only(args.only), args.reps, args.min_seconds,
                       argv)
    if (args.from_csv or args.merge) and not args.write_table:
        raise SystemExit("--from-csv and --merge go with --write-table")
    if args.write_table and args.backend != "fused":
        raise SystemExit("--write-table records the extension's own speed: use it with --backend fused")
    dtypes = (args.dtypes or "float32").split(",")
    if "bfloat16" in dtypes and not native_bf16():
        print("bfloat16 skipped: this CPU has no native bf16 arithmetic (avx512_bf16 / amx_bf16)", file=sys.stderr)
        dtypes.remove("bfloat16")
    chosen = cases(parse_only(args.only), dtypes)
    if args.sample is not None and args.sample < len(chosen):
        chosen = random.Random(args.seed).sample(chosen, args.sample)
    chosen.sort(key=Case.flops)  # cheap first, so a budget cuts the expensive tail
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{cpu_name()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), backend "
          f"{args.backend}, {len(chosen)} cases; load average {load}")
    rows, start = [], time.perf_counter()
    if args.sample == 0:
        chosen = []
    for case in chosen:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"budget reached: {len(chosen) - len(rows) // 2} cases not timed")
            break
        case_rows = measure(case, args.reps, args.min_seconds, args.backend)
        rows += case_rows
        print(case_line(case_rows), flush=True)
        if args.csv:
            write_csv(args.csv, case_rows, args.backend)
    if rows:
        print(summary(rows))
    print(f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.write_table:
        rows += read_csv(args.from_csv)
        command = "python bench/lstm_cpu_grid.py " + " ".join(sys.argv[1:])
        record = lstm_cpu_measured.read(args.table).get(torch.backends.cpu.get_cpu_capability())
        if args.merge and record is not None:
            rows += recorded_rows(record, {(case_key(r.case), r.mode) for r in rows})
            command = f"{record.command}; then {command}"
        write_table(rows, command, args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
