"""Where the LSTM extension measured slower than torch.nn.LSTM on CPU: the record behind ``auto``'s CPU rule.

``python bench/lstm_cpu_grid.py --sample N --write-table`` times the extension against torch.nn.LSTM (oneDNN) over
sampled grid cases and stores each case's medians in ``lstm_cpu_measured.json`` beside this file, under the CPU class
that ran them (``torch.backends.cpu.get_cpu_capability()``: the instruction set torch's own kernels use, "AVX512",
"AVX2", ...), replacing that class's earlier record. A call is judged by the :data:`NEIGHBOURS` measured cases of its
dtype and mode (training when autograd records it, else inference) nearest to it in

    log2 B, log2 T, log2 H (one unit per doubling), directions and log2 threads (one unit per difference each);

the extension is expected slower where their speed ratios' geometric mean, weighted by 1 / (1 + distance)^2, is below
1, and ``auto`` then runs the torch path. Several neighbours, not one, for calls between the measured cases: a single
timing on a shared machine can be off by 10-20%. Weighted, so that a call the record measured (distance 0) or nearly
so is not outvoted by farther cases (B=128 T=150 H=32 bf16 training, measured at 0.81x, ran the extension because a
case at T=512 measured 1.6x); the price is that such a call follows its own timing, noise included (its neighbours
count at most a quarter each). A class, dtype or mode without measurements keeps the extension (its design target);
so does the projection (proj_size), which runs the extension's BLAS path and which torch runs without oneDNN.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).resolve().with_name("lstm_cpu_measured.json")
TABLE_VERSION = 1
NEIGHBOURS = 3
MODES = ("train", "infer")


@dataclass(frozen=True)
class Case:
    """One grid case as measured: the medians of torch.nn.LSTM and of the extension, in ms."""

    dtype: str
    mode: str
    threads: int
    B: int
    T: int
    H: int
    D: int
    torch_ms: float
    fastmsc_ms: float

    @property
    def ratio(self) -> float:
        """torch's time over the extension's: below 1, the extension is slower."""
        return self.torch_ms / self.fastmsc_ms

    def distance(self, threads: int, B: int, T: int, H: int, D: int) -> float:
        return (abs(math.log2(self.B / B)) + abs(math.log2(self.T / T)) + abs(math.log2(self.H / H))
                + abs(self.D - D) + abs(math.log2(self.threads / threads)))

    def label(self) -> str:
        return f"B={self.B} T={self.T} H={self.H} D={self.D} {self.threads}t"


@dataclass(frozen=True)
class ClassRecord:
    """The measurements of one CPU class and where they were taken."""

    cpu: str
    torch: str
    measured: str  # ISO 8601 date
    command: str
    cases: tuple[Case, ...]


def read(path: Path = TABLE_PATH) -> dict[str, ClassRecord]:
    """The record per CPU class; empty where the file is absent."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: version {data.get('version')!r}, this fastmsc reads version {TABLE_VERSION}")
    return {name: ClassRecord(cpu=c["cpu"], torch=c["torch"], measured=c["measured"], command=c["command"],
                              cases=tuple(Case(**case) for case in c["cases"]))
            for name, c in data["classes"].items()}


def write(records: dict[str, ClassRecord], path: Path = TABLE_PATH) -> None:
    """JSON with one case per line, so that a new measurement reads as a diff of cases."""
    classes = []
    for name, r in sorted(records.items()):
        header = {k: v for k, v in asdict(r).items() if k != "cases"}
        cases = ",\n".join(f"    {json.dumps(asdict(case))}" for case in r.cases)
        classes.append(f"  {json.dumps(name)}: {{\n" + "".join(f"   {json.dumps(k)}: {json.dumps(v)},\n"
                                                              for k, v in header.items())
                       + f'   "cases": [\n{cases}\n   ]\n  }}')
    path.write_text(f'{{"version": {TABLE_VERSION}, "classes": {{\n' + ",\n".join(classes) + "\n}}\n")


class Rule:
    """The expected-slower judgement over one table (tests swap in their own)."""

    def __init__(self, records: dict[str, ClassRecord]):
        self.records = records
        self.slower = functools.lru_cache(maxsize=4096)(self._slower)

    def _slower(self, cpu_class: str, dtype: str, mode: str, threads: int, B: int, T: int, H: int,
                D: int) -> str | None:
        """Why the extension is expected slower for such a call, or None."""
        record = self.records.get(cpu_class)
        if record is None or B < 1 or T < 1 or H < 1:
            return None
        cases = [c for c in record.cases if c.dtype == dtype and c.mode == mode]
        if not cases:
            return None
        distances = sorted((c.distance(max(threads, 1), B, T, H, D), i) for i, c in enumerate(cases))[:NEIGHBOURS]
        nearest = [cases[i] for _, i in distances]
        weights = [1.0 / (1.0 + d) ** 2 for d, _ in distances]
        ratio = math.exp(sum(w * math.log(c.ratio) for w, c in zip(weights, nearest, strict=True)) / sum(weights))
        if ratio >= 1.0:
            return None
        cases_text = ", ".join(f"{c.label()} {c.ratio:.2f}x" for c in nearest)
        return (f"estimated at {ratio:.2f}x torch.nn.LSTM's speed ({mode}, {dtype}) from the nearest measured cases "
                f"({cases_text}) on {record.cpu} ({cpu_class}, torch {record.torch}, {record.measured[:10]})")

    def summary(self, cpu_class: str) -> str | None:
        """One sentence on this class's record, or None without one."""
        record = self.records.get(cpu_class)
        if record is None:
            return None
        slower = sum(c.ratio < 1.0 for c in record.cases)
        return (f"measured on {record.cpu} ({cpu_class}, torch {record.torch}, {record.measured[:10]}): the extension "
                f"was slower than torch.nn.LSTM in {slower} of {len(record.cases)} grid cases; auto runs torch for "
                f"calls nearest those")


@functools.lru_cache(maxsize=1)
def rule() -> Rule:
    return Rule(read())
