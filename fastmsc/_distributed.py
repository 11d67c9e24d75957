"""The device a run uses and the process group it may belong to (torchrun sets WORLD_SIZE and LOCAL_RANK)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) is CUDA when available, else CPU; under torchrun CUDA is cuda:LOCAL_RANK."""
    if name is None or str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """The sums of ``values`` over every rank (``values`` itself without a process group); a collective."""
    if distributed_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
