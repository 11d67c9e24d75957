"""fastmsc.info(): versions, devices, and which backend ``auto`` picks per op and device."""

from __future__ import annotations

import platform

import torch

from .backend import OPS, get_backend


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # any import failure means "not usable", whatever its cause
        return None
    return triton.__version__


def info() -> dict:
    """A dict of versions and, for each op and device, what ``auto`` picks and why ``fused`` is not picked."""
    from . import __version__

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
        "ops": {},
    }
    for name, op in sorted(OPS.items()):
        per_device = {}
        for device in devices:
            reason = op.why_not_fused(device)
            per_device[device] = {"auto": "fused" if reason is None else "torch", "fused_unavailable": reason}
        result["ops"][name] = per_device
    return result


def format_info(data: dict | None = None) -> str:
    data = info() if data is None else data
    lines = [f"{key}: {data[key]}" for key in ("fastmsc", "python", "torch", "triton", "cuda", "gpu", "cpu", "backend")]
    lines.append("ops (what backend 'auto' picks):")
    for name, per_device in data["ops"].items():
        for device, row in per_device.items():
            why = "" if row["fused_unavailable"] is None else f"  (fused unavailable: {row['fused_unavailable']})"
            lines.append(f"  {name:<18} {device:<5} -> {row['auto']}{why}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the info as JSON")


def run(args) -> int:
    if args.json:
        import json

        print(json.dumps(info(), indent=2))
    else:
        print(format_info())
    return 0
