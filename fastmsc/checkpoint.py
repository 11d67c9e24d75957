"""Resumable training checkpoints: what :func:`fastmsc.train.fit` saves after every epoch and resumes from.

A checkpoint is a dict loadable with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts):
``format`` (:data:`CHECKPOINT_FORMAT`), ``epoch`` (epochs done), ``model`` / ``optimizer`` / ``scheduler`` state
dicts, ``rng`` (one RNG state per rank: torch, CUDA, python, numpy), ``history`` (the per-epoch metric rows),
``config`` (the settings a resumed run must repeat, see :func:`check_resume`) and ``meta`` (the caller's).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ._distributed import distributed_world
from ._files import replace_atomically

CHECKPOINT_FORMAT = 1

# Settings fixed by a checkpoint: resuming with other values would not continue the same run. They set the
# optimiser, the schedule, the loss, the data order and the numerics (amp); ``model_config`` (the caller's
# description of the model and data) and ``model_repr`` (the model's module tree, dropout rates included) too.
RESUME_KEYS = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "steps_per_epoch",
               "world_size", "seed", "label_smoothing", "grad_clip", "class_weights", "amp", "train_size")
# Recorded since the checkpoint check covers the model: older checkpoints lack them and are refused.
_RESUME_KEYS_ADDED = ("train_size", "model_config", "model_repr")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: not a fastmsc checkpoint, or one of another run."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The checkpoint to resume from does not exist."""


class CheckpointMismatch(CheckpointError):
    """Resuming with settings other than the checkpoint's; ``differences`` maps each setting to
    (the checkpoint's value, the value given now)."""

    def __init__(self, path, differences: dict):
        self.path, self.differences = Path(path), dict(differences)
        listed = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in self.differences.items())
        super().__init__(f"cannot resume from {path}: the run's settings differ ({listed})")


# ------------------------------------------------------------------------------------------- RNG states


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # As tensors and plain numbers so the checkpoint loads with torch.load(weights_only=True).
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _gather_rng_states() -> list[dict]:
    rank, world = distributed_world()
    if world == 1:
        return [_rng_state()]
    states = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def restore_rng_states(states: list[dict], seed: int, epoch: int) -> None:
    """Continue this rank's RNG streams from a checkpoint's ``rng`` list (one state per rank).

    Saved by another number of processes, rank 0's state is taken and torch is reseeded with
    ``seed + rank + 1000 * epoch``, since ranks need distinct dropout streams.
    """
    rank, world = distributed_world()
    _set_rng_state(states[rank] if len(states) == world else states[0])
    if len(states) != world:
        torch.manual_seed(seed + rank + 1000 * epoch)


# ------------------------------------------------------------------------------------------- save, load


def save_checkpoint(path, *, epoch: int, model, optimizer, scheduler, history: list[dict], config: dict,
                    meta: dict) -> None:
    """Gather every rank's RNG state (a collective: every rank must call this) and, on rank 0, replace
    ``path`` atomically with the checkpoint of ``epoch`` epochs done. ``model`` is the unwrapped module."""
    rng_states = _gather_rng_states()
    if distributed_world()[0] == 0:
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states,
                 "history": history, "config": config, "meta": meta}
        replace_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`fastmsc.train.fit` (tensors, numbers and strings only: loads with
    weights_only). Raises :class:`MissingCheckpointError` or :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated file, another pickle, a foreign format: all mean "not ours"
        raise CheckpointError(f"{path} is not a fastmsc training checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastmsc training checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _first_difference(a: str, b: str) -> tuple[str, str]:
    """The first line where two module trees differ, each stripped (the whole texts if no line differs)."""
    for line_a, line_b in zip(a.splitlines(), b.splitlines(), strict=False):
        if line_a != line_b:
            return line_a.strip(), line_b.strip()
    return a, b


def check_resume(path, saved: dict, config: dict) -> None:
    """Raise :class:`CheckpointMismatch` unless the checkpoint's settings (``saved``, its ``config``) are this
    run's (``config``: :data:`RESUME_KEYS`, ``model_config`` and ``model_repr``), and :class:`CheckpointError`
    for a checkpoint that predates the check of the model and data."""
    missing = [k for k in _RESUME_KEYS_ADDED if k not in saved]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint predates the check that the model and "
                              f"data settings are unchanged (it records no {', '.join(missing)}); start a new run")
    different = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if saved.get(k) != config[k]}
    if different.keys() & {"batch_size", "train_size", "world_size"}:
        different.pop("steps_per_epoch", None)  # follows from those: naming it too would only add noise
    saved_model, model_config = saved["model_config"] or {}, config["model_config"] or {}
    for k in [*model_config, *(k for k in saved_model if k not in model_config)]:
        if saved_model.get(k) != model_config.get(k):
            different[k] = (saved_model.get(k), model_config.get(k))
    if not different and saved["model_repr"] != config["model_repr"]:
        different["model"] = _first_difference(saved["model_repr"], config["model_repr"])
    if different:
        raise CheckpointMismatch(path, different)
