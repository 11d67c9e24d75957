"""fastmsc.info(): versions, devices, and which backend ``auto`` picks per op and device."""

from __future__ import annotations

import platform
from dataclasses import asdict

import torch

from . import _extension, dispatch
from ._device import compute_capability
from ._version import __version__
from .backend import OPS, get_backend, get_lstm_impl


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # any import failure means "not usable", whatever its cause
        return None
    return triton.__version__


def _dispatch_for(op_name: str, device: str, unmeasured: str = "fused wherever supported") -> tuple[list[dict], str]:
    """The measured dispatch entries that apply to ``op_name`` on ``device`` and a sentence on where they come from;
    ``unmeasured``: what runs where nothing was measured."""
    if device != "cuda":
        note = OPS[op_name].cpu_dispatch_note() if op_name in OPS else None
        return [], (f"no dispatch measurements on CPU: {unmeasured}" if note is None else note)
    if (error := dispatch.table_error()) is not None:
        return [], f"dispatch table unreadable ({error}): {unmeasured}"
    capability = compute_capability(torch.device("cuda"))
    entries = dispatch.entries_for(op_name, capability)
    if not entries:
        return [], f"no dispatch measurements for sm_{capability} (this GPU): {unmeasured}"
    gpus = sorted({e.gpu for e in entries})
    candidate, baseline = dispatch.choices_for(op_name)
    return ([{**asdict(e), "why": e.why()} for e in entries],
            f"measured on {', '.join(gpus)} (sm_{capability}): {baseline} where {candidate} was slower; "
            f"elsewhere {unmeasured}")


# What each FASTMSC_LSTM_IMPL value runs on a GPU (fastmsc.backend.LSTM_IMPLS; the limit is
# fastmsc.kernels.lstm_persistent.MAX_HIDDEN, repeated here so that info never imports a kernel module).
_LSTM_IMPL_TEXT = {
    "auto": "auto (FASTMSC_LSTM_IMPL): on CUDA the persistent Triton kernel for layers it takes (hidden size <= 512, "
            "no projection) where its design expects a win (W_hh per step <= 512 KB, one wave of programs) and the "
            "dispatch table did not measure it slower, else the stepwise extension; on CPU the extension",
    "persistent": "persistent (FASTMSC_LSTM_IMPL): the Triton kernel, one launch per layer; layers it cannot take "
                  "are refused (backend 'fused') or run on torch ('auto')",
    "stepwise": "stepwise (FASTMSC_LSTM_IMPL): the compiled extension on every device",
}


def info() -> dict:
    """A dict of versions and, for each op and device, what ``auto`` picks and why.

    Per op and device: ``auto`` (fused, torch, or "fused or torch by measurement" where the dispatch table
    sends some calls to torch), ``fused_unavailable`` (why fused cannot run, or None), ``dispatch`` (the
    measured entries for this GPU, each with a ``why``) and ``dispatch_note``.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {
        "fastmsc": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "backend": get_backend(),
        "lstm_extension": _extension.describe(),
        "lstm_impl": _LSTM_IMPL_TEXT[get_lstm_impl()],
        "dispatch_table": str(dispatch.TABLE_PATH),
        "ops": {},
    }
    for name, op in sorted(OPS.items()):
        per_device = {}
        for device in devices:
            reason = op.why_not_fused(device)
            slower = op.expected_slower(device) if reason is None else None
            unmeasured = "fused wherever supported" if slower is None else f"torch, as {slower}"
            entries, note = _dispatch_for(name, device, unmeasured) if reason is None else ([], "")
            if reason is not None:
                auto = "torch"
            elif slower is not None:  # unmeasured sizes run torch
                auto = "torch or fused by measurement" if any(e["choice"] == "fused" for e in entries) else "torch"
            elif any(e["choice"] == "torch" for e in entries) or (device == "cpu" and op.cpu_dispatch_note()):
                auto = "fused or torch by measurement"  # unmeasured sizes still run fused
            else:
                auto = "fused"
            per_device[device] = {"auto": auto, "fused_unavailable": reason, "dispatch": entries,
                                  "dispatch_note": note}
        result["ops"][name] = per_device
    if "cuda" in devices and get_lstm_impl() == "auto":
        result["lstm_impl_dispatch"], result["lstm_impl_note"] = _dispatch_for(dispatch.LSTM_IMPL_OP, "cuda")
    return result


def format_info(data: dict | None = None) -> str:
    data = info() if data is None else data
    lines = [f"{key}: {data[key]}" for key in ("fastmsc", "python", "torch", "triton", "cuda", "gpu", "cpu", "backend",
                                                   "lstm_extension", "lstm_impl")]
    lines.append("ops (what backend 'auto' picks):")
    for name, per_device in data["ops"].items():
        for device, row in per_device.items():
            if row["fused_unavailable"] is not None:
                why = f"  (fused unavailable: {row['fused_unavailable']})"
            elif device == "cuda" or row["auto"] != "fused":
                why = f"  ({row['dispatch_note']})"
            else:
                why = ""
            lines.append(f"  {name:<18} {device:<5} -> {row['auto']}{why}")
            lines.extend(_entry_lines(row.get("dispatch", [])))
    if "lstm_impl_note" in data:
        lines.append(f"LSTM implementation on cuda ({data['lstm_impl_note']})")
        lines.extend(_entry_lines(data["lstm_impl_dispatch"]))
    return "\n".join(lines)


def _entry_lines(entries: list[dict]) -> list[str]:
    return [f"      {entry['dtype']} {entry['mode']} size {entry['bucket']}: {entry['choice']}  ({entry['why']})"
            for entry in entries]
