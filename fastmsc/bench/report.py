"""Output of a benchmark run: the environment tags, the printed table, the CSV rows and the PNG chart."""

from __future__ import annotations

import csv
import importlib.util
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._version import __version__
from ..dispatch import dtype_name
from .checks import tf32_enabled
from .rows import Result
from .timing import Stats

ENV_COLUMNS = ("timestamp", "device", "device_name", "threads", "python", "torch", "triton", "fastmsc",
               "peak_copy_gbps", "peak_matmul_tflops")
CSV_COLUMNS = (
    *ENV_COLUMNS,
    "op", "mode", "shape", "dtype", "backend", "status",
    "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "repeats", "warmup", "speedup_vs_torch",
    "tflops", "gbps", "pct_of_peak", "bound",
    "saved_bytes", "max_rel_error", "tolerance", "worst", "checked_on", "first_call_s", "seed", "note",
)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # any import failure means triton is not usable here
        return ""
    return triton.__version__


def environment(device: torch.device, peaks=None, dtype: torch.dtype | None = None) -> dict:
    """Tags written on every CSV row: device, versions, the run's ISO 8601 start time (UTC) and the ceilings
    measured for it (``peaks``, a fastmsc.bench.roofline.Peaks: copy GB/s and the matmul TFLOP/s of ``dtype``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        name += ", TF32 on" if tf32_enabled() else ", TF32 off"
    else:
        name = cpu_model()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fastmsc": __version__,
        "peak_copy_gbps": "" if peaks is None else f"{peaks.copy_gbps:.6g}",
        "peak_matmul_tflops": "" if peaks is None or dtype is None
        else f"{peaks.matmul_tflops.get(dtype_name(dtype), float('nan')):.6g}",
        "peaks": "" if peaks is None else peaks.describe(),
    }


def _g(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def csv_row(result: Result, env: dict, warmup: int) -> dict:
    s = result.stats
    row = {k: env.get(k, "") for k in ENV_COLUMNS}
    row.update(
        op=result.op, mode=result.mode, shape=result.shape, dtype=result.dtype, backend=result.backend,
        status=result.status,
        median_ms=_g(s and s.median_ms, ".6g"), q1_ms=_g(s and s.q1_ms, ".6g"), q3_ms=_g(s and s.q3_ms, ".6g"),
        min_ms=_g(s and s.min_ms, ".6g"), max_ms=_g(s and s.max_ms, ".6g"), repeats=_g(s and s.repeats, "d"),
        warmup=warmup if s else "", speedup_vs_torch=_g(result.speedup, ".6g"),
        tflops=_g(result.tflops, ".6g"), gbps=_g(result.gbps, ".6g"), pct_of_peak=_g(result.pct_of_peak, ".6g"),
        bound=result.bound,
        saved_bytes=_g(result.saved_bytes, "d"), max_rel_error=_g(result.max_error, ".6g"),
        tolerance=_g(result.tolerance, ".1g"), worst=result.worst, checked_on=result.checked_on,
        first_call_s=_g(result.first_call_s, ".3g"), seed=_g(result.seed, "d"), note=result.note,
    )
    return row


def check_csv(path) -> bool:
    """Whether ``path`` is new (or empty); raises ValueError when it exists with other columns."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_COLUMNS:
            raise ValueError(f"--csv {path} exists with other columns ({', '.join(header[:6])}, ...); "
                             f"pass a new file to --csv or move the old one away")
        return False
    return True


def write_csv(path, results: list[Result], env: dict, warmup: int) -> None:
    """Append one row per result to ``path``, writing the header first if the file is new or empty."""
    path = Path(path)
    new = check_csv(path)
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for result in results:
            writer.writerow(csv_row(result, env, warmup))


def _number(text: str, kind=float):
    return None if text in ("", None) else kind(float(text)) if kind is int else kind(text)


def read_csv(path) -> list[tuple[dict, Result]]:
    """The rows of a CSV written by :func:`write_csv`, each as (its environment tags, its Result)."""
    path = Path(path)
    check_csv(path)
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for line in csv.DictReader(f):
            env = {k: line[k] for k in ENV_COLUMNS}
            stats = None
            if line["median_ms"]:
                stats = Stats(*(float(line[k]) for k in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms")),
                              int(line["repeats"]))
            rows.append((env, Result(
                op=line["op"], mode=line["mode"], shape=line["shape"], dtype=line["dtype"], backend=line["backend"],
                status=line["status"], stats=stats, speedup=_number(line["speedup_vs_torch"]),
                saved_bytes=_number(line["saved_bytes"], int), max_error=_number(line["max_rel_error"]),
                tolerance=_number(line["tolerance"]), worst=line["worst"], checked_on=line["checked_on"],
                seed=_number(line["seed"], int), first_call_s=_number(line["first_call_s"]), note=line["note"],
                tflops=_number(line["tflops"]), gbps=_number(line["gbps"]), pct_of_peak=_number(line["pct_of_peak"]),
                bound=line["bound"])))
    return rows


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _ms(value: float) -> str:
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def format_bytes(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


TABLE_COLUMNS = ("op", "mode", "shape", "backend", "status", "median ms", "IQR ms", "min-max ms", "vs torch",
                 "TFLOP/s", "GB/s", "% peak", "saved", "max err", "checked on")


def _checked(result: Result) -> str:
    """'full' or 'B=8/32' (the reference check ran on the first 8 of 32 batch rows)."""
    if not result.checked_on:
        return ""
    if result.checked_on == "full shape":
        return "full"
    return result.checked_on.split(" (")[0].replace(" of ", "/")


def format_table(results: list[Result], env: dict | None = None, header: str = "") -> str:
    """A fixed-width table, one line per result; notes (why unavailable, what differed) become footnotes."""
    notes: dict[str, int] = {}
    lines = []
    for r in results:
        s = r.stats
        status = r.status
        if r.note:
            number = notes.setdefault(r.note, len(notes) + 1)
            status = f"{status} [{number}]"
        lines.append((
            r.op, r.mode, r.shape, r.backend, status,
            _ms(s.median_ms) if s else "", f"{_ms(s.q1_ms)}-{_ms(s.q3_ms)}" if s else "",
            f"{_ms(s.min_ms)}-{_ms(s.max_ms)}" if s else "",
            f"{r.speedup:.2f}x" if r.speedup is not None else "",
            _rate(r.tflops), _rate(r.gbps),
            f"{r.pct_of_peak:.0f}% {r.bound}" if r.pct_of_peak is not None else "", format_bytes(r.saved_bytes),
            f"{r.max_error:.1e}" if r.max_error is not None else "", _checked(r),
        ))
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(TABLE_COLUMNS)]
    numeric = set(range(5, len(TABLE_COLUMNS) - 1))

    def fmt(cells):
        pairs = enumerate(zip(cells, widths, strict=True))
        padded = (c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in pairs)
        return "  ".join(padded)

    out = []
    if env is not None:
        out.append(f"device: {env['device']} ({env['device_name']}), {env['threads']} threads; torch {env['torch']}, "
                   f"triton {env['triton'] or 'absent'}, python {env['python']}, fastmsc {env['fastmsc']}; "
                   f"{env['timestamp']}")
        if env.get("peaks"):
            out.append(env["peaks"])
        elif env.get("peak_copy_gbps"):
            out.append(f"ceilings measured in this run: copy {env['peak_copy_gbps']} GB/s (read + write), matmul "
                       f"{env['peak_matmul_tflops']} TFLOP/s")
    if header:
        out.append(header)
    out += [fmt(TABLE_COLUMNS), fmt(["-" * w for w in widths])]
    out += [fmt(line).rstrip() for line in lines]
    if notes:
        out.append("")
        out += [f"[{number}] {note}" for note, number in notes.items()]
    return "\n".join(out)


def matplotlib_missing() -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'fastmsc[plot]')")
    return None


def plot(path, results: list[Result], env: dict) -> int:
    """Grouped bars of median time (log scale) per measurement, one colour per backend, labelled with the
    speed-up vs torch. Returns the number of bars drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.status == "ok" and r.stats]
    groups = list(dict.fromkeys((r.op, r.mode, r.shape) for r in timed))
    backends = list(dict.fromkeys(r.backend for r in timed))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(backends)) * 0.45 + 2), 5.5))
    width = 0.8 / max(1, len(backends))
    for j, backend in enumerate(backends):
        xs, heights, labels = [], [], []
        for i, group in enumerate(groups):
            row = next((r for r in timed if (r.op, r.mode, r.shape) == group and r.backend == backend), None)
            if row is not None:
                xs.append(i + (j - (len(backends) - 1) / 2) * width)
                heights.append(row.stats.median_ms)
                labels.append(f"{row.speedup:.2f}x" if row.speedup is not None else "")
        bars = ax.bar(xs, heights, width, label=backend)
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{op}\n{mode}\n{shape}" for op, mode, shape in groups], fontsize=6, rotation=60, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    dtype = timed[0].dtype if timed else ""
    ax.set_title(f"fastmsc bench: {env['device_name']}, {dtype}, torch {env['torch']} ({env['timestamp']})", fontsize=8)
    if backends:
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return len(timed)
