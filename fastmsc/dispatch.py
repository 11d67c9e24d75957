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
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._device import compute_capability, dtype_name
from ._files import write_json

TABLE_VERSION = 1
TABLE_PATH = Path(__file__).resolve().with_name("dispatch_table.json")
CHOICES = ("fused", "torch")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Entry:
    """One measured verdict. ``fused_ms`` / ``torch_ms`` are the medians it was decided on (None when the
    fused path failed its check or raised there, which also makes the choice ``torch``)."""

    op: str
    mode: str
    dtype: str
    bucket: str
    capability: int
    choice: str
    gpu: str
    shape: str
    fused_ms: float | None
    torch_ms: float | None
    measured: str  # ISO 8601 time of the benchmark run
    versions: str  # "fastmsc X, torch Y, triton Z"

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return self.op, self.mode, self.dtype, self.bucket, self.capability

    def why(self) -> str:
        """'fused 0.412 ms vs torch 0.538 ms (1.31x) on NVIDIA H200 (B=32 T=512 E=256, 2026-12-01)'."""
        where = f"on {self.gpu} ({self.shape}, {self.measured[:10]})"
        if self.fused_ms is None:
            return f"fused failed its check or raised {where}"
        return (f"fused {self.fused_ms:.3g} ms vs torch {self.torch_ms:.3g} ms "
                f"({self.torch_ms / self.fused_ms:.2f}x) {where}")


def size_bucket(numel: int) -> str:
    """``2^k`` with k even and 4^(k/2) <= numel < 4^(k/2 + 1); ``2^0`` for empty or one-element inputs."""
    exponent = 2 * int(math.log(numel, 4) + 1e-9) if numel > 1 else 0
    return f"2^{exponent}"


# The device types whose calls the table decides (a test widens it to trace the lookup on CPU).
DEVICE_TYPES = ("cuda",)


class DispatchTableError(ValueError):
    """A dispatch table file that is not a table of this version."""


def _parse(data, source: str) -> list[Entry]:
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION or not isinstance(data.get("entries"), list):
        version = data.get("version") if isinstance(data, dict) else None
        raise DispatchTableError(f"{source} is not a fastmsc dispatch table of version {TABLE_VERSION} "
                                 f"(found version {version!r})")
    entries = []
    for i, item in enumerate(data["entries"]):
        try:
            entry = Entry(**item)
        except TypeError as exc:
            raise DispatchTableError(f"{source}: entry {i} lacks the fields of a dispatch entry ({exc})") from None
        if entry.choice not in CHOICES or entry.mode not in MODES:
            raise DispatchTableError(f"{source}: entry {i} has choice {entry.choice!r} and mode {entry.mode!r}; "
                                     f"expected one of {CHOICES} and {MODES}")
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
    """Entries from benchmark measurements of the ``torch`` and ``fused`` backends on one GPU.

    Each row: op, mode, dtype, shape, numel (of the main input), capability, gpu, measured, versions,
    torch_ms and fused_ms (None when that backend failed its check or raised). Rows without a torch time
    give no verdict. A bucket is ``fused`` only when fused was not slower on every shape measured in it.
    """
    buckets: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["torch_ms"] is None:
            continue
        key = (row["op"], row["mode"], row["dtype"], size_bucket(row["numel"]), row["capability"])
        buckets.setdefault(key, []).append(row)
    entries = []
    for (op, mode, dtype, bucket, capability), group in buckets.items():
        losing = [r for r in group if r["fused_ms"] is None or r["fused_ms"] > r["torch_ms"]]
        # The row the verdict rests on: the worst loss, or the narrowest win.
        decisive = min(losing or group, key=lambda r: (r["torch_ms"] / r["fused_ms"]) if r["fused_ms"] else 0.0)
        entries.append(Entry(op=op, mode=mode, dtype=dtype, bucket=bucket, capability=capability,
                             choice="torch" if losing else "fused", gpu=decisive["gpu"], shape=decisive["shape"],
                             fused_ms=decisive["fused_ms"], torch_ms=decisive["torch_ms"],
                             measured=decisive["measured"], versions=decisive["versions"]))
    return entries
