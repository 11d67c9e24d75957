"""Measured dispatch: where backend ``auto`` takes stock PyTorch although a fused path could run.

``auto`` runs an op's fused path wherever it supports the call (``Op.why_not_fused``). On a GPU the fused
path is also required not to be slower than the ``torch`` backend: ``fastmsc bench --device cuda
--write-dispatch`` measures both on that GPU and records a verdict per

    (op, mode, dtype, size bucket, GPU compute capability)

in the versioned table ``fastmsc/dispatch_table.json`` shipped with the package. ``auto`` reads it through
:func:`lookup`; where the table has no entry the rule above holds (fused wherever supported).

* mode: ``fwd+bwd`` when autograd will record the call (grad enabled and an input requires grad), else ``fwd``;
* size bucket: the element count of the op's main input (``x`` or ``q``) rounded down to a power of 4,
  written ``2^k`` (k even): the benchmark's shapes (batch 32, T = 150 / 512 / 2048) fall in different
  buckets, and a call is judged by measurements of the same order of size;
* a bucket measured with several shapes is ``fused`` only if the fused path won on every one of them.

The same table also decides between the fused LSTM's two GPU implementations where ``FASTMSC_LSTM_IMPL`` is
``auto``: entries of the pseudo-op ``lstm_impl`` (keyed like lstm_layer's, by its input x) choose ``persistent``
(the Triton kernel) or ``stepwise`` (the extension), from the bench's ``persistent`` and ``stepwise`` rows.
Every op has a candidate and a baseline (:func:`choices_for`); a bucket takes the candidate only where it was
not slower on any shape measured in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._device import compute_capability, dtype_name
from ._files import write_json

# Version 2 keeps each verdict's medians by choice name (``times_ms``); version 1 files (``fused_ms``,
# ``torch_ms``) still read.
TABLE_VERSION = 2
TABLE_PATH = Path(__file__).resolve().with_name("dispatch_table.json")
MODES = ("fwd", "fwd+bwd")
# The pseudo-op whose entries choose the fused LSTM's GPU implementation (FASTMSC_LSTM_IMPL=auto).
LSTM_IMPL_OP = "lstm_impl"
_CHOICES = {LSTM_IMPL_OP: ("persistent", "stepwise")}


def choices_for(op: str) -> tuple[str, str]:
    """(candidate, baseline) of ``op``'s verdicts: ("fused", "torch") for the ops, ("persistent", "stepwise") for
    :data:`LSTM_IMPL_OP`."""
    return _CHOICES.get(op, ("fused", "torch"))


@dataclass(frozen=True)
class Entry:
    """One measured verdict. ``times_ms`` maps the candidate and the baseline (:func:`choices_for`) to the medians
    it was decided on; the candidate's is None when it failed its check or raised there, which also makes the
    choice the baseline."""

    op: str
    mode: str
    dtype: str
    bucket: str
    capability: int
    choice: str
    gpu: str
    shape: str
    times_ms: dict[str, float | None] = field(hash=False)
    measured: str  # ISO 8601 time of the benchmark run
    versions: str  # "fastmsc X, torch Y, triton Z"

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return self.op, self.mode, self.dtype, self.bucket, self.capability

    def why(self) -> str:
        """'fused 0.412 ms vs torch 0.538 ms (1.31x) on NVIDIA H200 (B=32 T=512 E=256, 2026-12-01)'."""
        candidate, baseline = choices_for(self.op)
        candidate_ms, baseline_ms = self.times_ms.get(candidate), self.times_ms.get(baseline)
        where = f"on {self.gpu} ({self.shape}, {self.measured[:10]})"
        if candidate_ms is None:
            return f"{candidate} failed its check or raised {where}"
        return (f"{candidate} {candidate_ms:.3g} ms vs {baseline} {baseline_ms:.3g} ms "
                f"({baseline_ms / candidate_ms:.2f}x) {where}")


def size_bucket(numel: int) -> str:
    """``2^k`` with k even and 4^(k/2) <= numel < 4^(k/2 + 1); ``2^0`` for empty or one-element inputs."""
    exponent = 2 * int(math.log(numel, 4) + 1e-9) if numel > 1 else 0
    return f"2^{exponent}"


# The device types whose calls the table decides (a test widens it to trace the lookup on CPU).
DEVICE_TYPES = ("cuda",)


class DispatchTableError(ValueError):
    """A dispatch table file that is not a table of this version."""


def _parse(data, source: str) -> list[Entry]:
    version = data.get("version") if isinstance(data, dict) else None
    if version not in (1, TABLE_VERSION) or not isinstance(data.get("entries"), list):
        raise DispatchTableError(f"{source} is not a fastmsc dispatch table of version {TABLE_VERSION} "
                                 f"(found version {version!r})")
    entries = []
    for i, item in enumerate(data["entries"]):
        if version == 1 and isinstance(item, dict):  # fused_ms / torch_ms fields, ops only
            item = {key: value for key, value in item.items() if key not in ("fused_ms", "torch_ms")} | {
                "times_ms": {"fused": item.get("fused_ms"), "torch": item.get("torch_ms")}}
        try:
            entry = Entry(**item)
        except TypeError as exc:
            raise DispatchTableError(f"{source}: entry {i} lacks the fields of a dispatch entry ({exc})") from None
        choices = choices_for(entry.op)
        if entry.choice not in choices or entry.mode not in MODES or not isinstance(entry.times_ms, dict):
            raise DispatchTableError(f"{source}: entry {i} ({entry.op}) has choice {entry.choice!r} and mode "
                                     f"{entry.mode!r}; expected one of {choices} and {MODES}, with times_ms a mapping")
        entries.append(entry)
    return entries


def read_table(path) -> list[Entry]:
    """The entries of the table at ``path`` (an absent file is an empty table)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DispatchTableError(f"{path} cannot be read as JSON ({type(exc).__name__}: {exc})") from None
    return _parse(data, str(path))


def write_table(path, new_entries: Iterable[Entry]) -> list[Entry]:
    """Merge ``new_entries`` into the table at ``path`` (an entry replaces the one with the same key) and write
    it atomically, sorted. Returns the merged entries."""
    merged = {entry.key: entry for entry in read_table(path)}
    merged.update({entry.key: entry for entry in new_entries})
    entries = sorted(merged.values(), key=lambda e: (e.op, e.capability, e.dtype, e.mode, int(e.bucket[2:])))
    write_json(path, {"version": TABLE_VERSION, "entries": [asdict(e) for e in entries]})
    return entries


class _Table:
    """The package's table, loaded once; a broken file means no data (fastmsc.info() says why)."""

    def __init__(self, path: Path):
        self.path = path
        self.error: str | None = None
        try:
            self.entries = read_table(path)
        except DispatchTableError as exc:
            self.entries, self.error = [], str(exc)
        self.by_key = {entry.key: entry for entry in self.entries}


_table = _Table(TABLE_PATH)


def use_table(path) -> None:
    """Read the dispatch table from ``path`` instead of the package's (tests, or a table measured locally)."""
    global _table
    _table = _Table(Path(path))


def table_error() -> str | None:
    return _table.error


def mode_of(tensors: Iterable[torch.Tensor | None]) -> str:
    """``fwd+bwd`` when autograd records this call, else ``fwd``."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "fwd+bwd"
    return "fwd"


def covers(device_type: str) -> bool:
    """Whether the table holds verdicts that calls on ``device_type`` may find (never on CPU)."""
    return device_type in DEVICE_TYPES and bool(_table.by_key)


def lookup(op: str, main: torch.Tensor, tensors: Iterable[torch.Tensor | None]) -> Entry | None:
    """The measured verdict for calling ``op`` with main input ``main`` (its device, dtype and size) and the
    given tensor arguments, or None where the table has no data (always on CPU)."""
    if main.device.type not in DEVICE_TYPES or not _table.by_key:
        return None
    key = (op, mode_of(tensors), dtype_name(main.dtype), size_bucket(main.numel()), compute_capability(main.device))
    return _table.by_key.get(key)


def entries_for(op: str, capability: int | None) -> list[Entry]:
    """The table's entries for ``op`` on GPUs of ``capability`` (every capability when None)."""
    return [e for e in _table.entries if e.op == op and (capability is None or e.capability == capability)]


def verdicts(rows: Iterable[dict]) -> list[Entry]:
    """Entries from benchmark measurements on one GPU.

    Each row: op, mode, dtype, shape, numel (of the main input), capability, gpu, measured, versions, and
    times_ms: the medians of the op's candidate and baseline (:func:`choices_for`), the candidate's None when it
    failed its check or raised. Rows without a baseline time give no verdict. A bucket takes the candidate only
    when it was not slower on every shape measured in it.
    """
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["times_ms"].get(choices_for(row["op"])[1]) is None:
            continue
        key = (row["op"], row["mode"], row["dtype"], size_bucket(row["numel"]), row["capability"])
        buckets.setdefault(key, []).append(row)
    entries = []
    for (op, mode, dtype, bucket, capability), group in buckets.items():
        candidate, baseline = choices_for(op)
        speedups = [_speedup(row, candidate, baseline) for row in group]
        losing = [row for row, speedup in zip(group, speedups, strict=True) if speedup < 1.0]
        # The row the verdict rests on: the worst loss, or the narrowest win.
        decisive = group[speedups.index(min(speedups))]
        entries.append(Entry(op=op, mode=mode, dtype=dtype, bucket=bucket, capability=capability,
                             choice=baseline if losing else candidate, gpu=decisive["gpu"], shape=decisive["shape"],
                             times_ms={candidate: decisive["times_ms"].get(candidate),
                                       baseline: decisive["times_ms"][baseline]},
                             measured=decisive["measured"], versions=decisive["versions"]))
    return entries


def _speedup(row: dict, candidate: str, baseline: str) -> float:
    """The baseline's time over the candidate's in one benchmark row; 0 where the candidate has no time."""
    candidate_ms = row["times_ms"].get(candidate)
    return row["times_ms"][baseline] / candidate_ms if candidate_ms else 0.0
