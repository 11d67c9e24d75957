"""Summaries for bench/gpu_check.sh, from the files a run leaves (standard library only, so it starts in
milliseconds and works whatever state torch is in).

    python bench/gpu_check_report.py count CSV                 # data rows in a `fastmsc bench --csv` file
    python bench/gpu_check_report.py rows CSV --start N        # "12 rows: 10 ok, 2 skipped" for rows N.. of CSV
    python bench/gpu_check_report.py filter CSV OUT            # copy CSV without its `skipped` rows to OUT
    python bench/gpu_check_report.py digest CSV                # one line per case: median ms (speed-up) per backend
    python bench/gpu_check_report.py tests JUNIT_XML           # passed/failed/skipped counts, failures and reasons
    python bench/gpu_check_report.py outputs DIR --allowed NAME... [--max N]   # DIR holds only these, <= N files

``digest`` is the compact form of the benchmark table that gpu_check.sh prints when the full table (of
``fastmsc bench --table-from``) would not fit the end of the output people read.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

BACKEND_ORDER = ("torch", "naive", "fused", "compile", "reference")
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
FAILED_STATUSES = ("mismatch", "error")
OUTPUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def read_rows(path) -> list[dict]:
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def status_counts(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    counts = Counter(row["status"] for row in rows)
    order = sorted(counts, key=lambda s: (s != "ok", s))
    return f"{len(rows)} row{'s' if len(rows) != 1 else ''}: " + ", ".join(f"{counts[s]} {s}" for s in order)


def filter_rows(src, dst) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` without its ``skipped`` rows; returns (kept, skipped)."""
    path = Path(src)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    kept = [row for row in rows if row.get("status") != "skipped"]
    with Path(dst).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return len(kept), len(rows) - len(kept)


def _cell(row: dict | None, baseline: bool) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" or not row.get("median_ms"):
        return row["status"]
    if baseline:
        return f"{float(row['median_ms']):.4g}"
    return f"{float(row['speedup_vs_torch']):.2f}x" if row.get("speedup_vs_torch") else "ok"


def _dims(shape: str) -> list[tuple[str, str]]:
    return [tuple(part.split("=", 1)) for part in shape.split() if "=" in part]


def digest(rows: list[dict]) -> str:
    """One line per (op, mode, dtype, shape): the torch median in ms, then every other backend's speed-up
    over the torch row of its own run (or its status: mismatch, error, unavailable, skipped). Dimensions
    that one op keeps the same in every row are said once, below the table."""
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        backends = cases.setdefault((row["op"], row["mode"], row["dtype"], row["shape"]), {})
        # the first row of a backend wins (the torch.compile step times torch again, as its own baseline),
        # except that a measured row replaces a skipped one
        if row["backend"] not in backends or backends[row["backend"]]["status"] == "skipped":
            backends[row["backend"]] = row
    if not cases:
        return "no benchmark rows"
    constant: dict[str, dict[str, str]] = {}
    for op, _, _, shape in cases:
        dims = dict(_dims(shape))
        constant[op] = dims if op not in constant else {k: v for k, v in constant[op].items() if dims.get(k) == v}
    present = [b for b in BACKEND_ORDER if any(b in backends for backends in cases.values())]
    present += sorted({b for backends in cases.values() for b in backends} - set(present))
    others = [b for b in present if b != "torch"]
    header = ["op", "mode", "dtype", "shape", "torch ms", *(f"{b} x" for b in others)]
    lines = []
    for (op, mode, dtype, shape), backends in cases.items():
        varying = " ".join(f"{k}={v}" for k, v in _dims(shape) if k not in constant[op]) or "-"
        lines.append([op, mode, SHORT_DTYPE.get(dtype, dtype), varying, _cell(backends.get("torch"), True),
                      *(_cell(backends.get(b), False) for b in others)])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

    def fmt(cells):
        padded = (c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    fixed = [f"{op} " + " ".join(f"{k}={v}" for k, v in dims.items()) for op, dims in constant.items() if dims]
    footer = ["same in every row: " + "; ".join(fixed)] if fixed else []
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines), *footer])


def _test_id(case: ET.Element) -> str:
    classname, name = case.get("classname", ""), case.get("name", "")
    parts = classname.split(".")
    # pytest's classname is the module path with dots (plus a class name, capitalised, if any)
    split = next((i for i, p in enumerate(parts) if p[:1].isupper()), len(parts))
    module = "/".join(parts[:split]) + ".py" if split else ""
    return "::".join(p for p in (module, *parts[split:], name) if p)


def _first_line(text: str | None, limit: int = 160) -> str:
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def test_summary(path, max_listed: int = 15) -> str:
    """Counts, then each failing or erroring test with the first line of its message, then skip reasons."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return f"no test results ({type(exc).__name__}: {exc})"
    cases = list(root.iter("testcase"))
    seconds = sum(float(s.get("time", 0) or 0) for s in root.iter("testsuite"))
    failed, errors, skipped = [], [], Counter()
    for case in cases:
        failure, error, skip = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            failed.append((_test_id(case), _first_line(failure.get("message") or failure.text)))
        elif error is not None:
            errors.append((_test_id(case), _first_line(error.get("message") or error.text)))
        elif skip is not None:
            skipped[_first_line(skip.get("message") or skip.text, 120)] += 1
    passed = len(cases) - len(failed) - len(errors) - sum(skipped.values())
    lines = [f"{passed} passed, {len(failed)} failed, {len(errors)} errors, {sum(skipped.values())} skipped "
             f"({len(cases)} tests, {seconds:.0f} s in the test processes)"]
    problems = [("FAILED", *f) for f in failed] + [("ERROR", *e) for e in errors]
    for kind, test, message in problems[:max_listed]:
        lines.append(f"  {kind} {test}: {message}")
    if len(problems) > max_listed:
        lines.append(f"  ... and {len(problems) - max_listed} more (see cuda_tests.xml)")
    for reason, count in skipped.most_common(4):
        lines.append(f"  skipped x{count}: {reason}")
    if len(skipped) > 4:
        lines.append(f"  skipped: {len(skipped) - 4} more reasons (see cuda_tests.xml)")
    return "\n".join(lines)


def check_outputs(folder, allowed: list[str], max_files: int) -> list[str]:
    """Problems with ``folder`` as the outputs of a run: files not in ``allowed``, subfolders, odd names,
    more than ``max_files`` files."""
    problems = []
    entries = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    for path in entries:
        if path not in files:
            problems.append(f"{path.name}: not a plain file")
        elif not OUTPUT_NAME.match(path.name):
            problems.append(f"{path.name}: name outside [A-Za-z0-9._-]")
        elif path.name not in allowed:
            problems.append(f"{path.name}: not one of the outputs ({', '.join(allowed)})")
    if len(entries) > max_files:
        problems.append(f"{len(entries)} entries, more than {max_files}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("count").add_argument("csv")
    rows = sub.add_parser("rows")
    rows.add_argument("csv")
    rows.add_argument("--start", type=int, default=0)
    flt = sub.add_parser("filter")
    flt.add_argument("csv")
    flt.add_argument("out")
    sub.add_parser("digest").add_argument("csv")
    tests = sub.add_parser("tests")
    tests.add_argument("xml")
    tests.add_argument("--max-listed", type=int, default=15)
    outputs = sub.add_parser("outputs")
    outputs.add_argument("folder")
    outputs.add_argument("--allowed", nargs="+", required=True)
    outputs.add_argument("--max", type=int, default=8)
    args = parser.parse_args(argv)

    if args.command == "count":
        print(len(read_rows(args.csv)))
    elif args.command == "rows":
        print(status_counts(read_rows(args.csv)[args.start:]))
    elif args.command == "filter":
        kept, dropped = filter_rows(args.csv, args.out)
        print(f"{kept} rows ({dropped} skipped rows left out)")
    elif args.command == "digest":
        print(digest(read_rows(args.csv)))
    elif args.command == "tests":
        print(test_summary(args.xml, args.max_listed))
    elif args.command == "outputs":
        problems = check_outputs(args.folder, args.allowed, args.max)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
