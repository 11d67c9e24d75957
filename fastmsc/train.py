"""Training: :func:`fit` (AdamW, cosine LR per step with optional warm-up, cross-entropy, gradient clipping,
bf16 autocast on CUDA, metrics files, resumable checkpoints, DistributedDataParallel) and ``fastmsc train``.

Data are :class:`fastmsc.data.SeriesData` (or tuples ``(x, y)`` / ``(x, y, lengths)``): x (N, C, T) float32,
y (N,) int64 in 0..K-1, lengths (N,) int64 or None. Each batch keeps its lengths, so the model is called as
``model(x (B, C, T_batch), lengths (B,) | None) -> logits (B, K)``, with T_batch the longest series in the batch.

Scale-out: under ``torchrun --nproc_per_node N -m fastmsc train ...`` (WORLD_SIZE > 1 in the environment)
the process group is initialised (gloo on CPU, nccl on CUDA) and :func:`fit` wraps the model in
DistributedDataParallel and shards each epoch with a DistributedSampler: a global batch is ``batch_size *
world_size`` series, gradients are averaged over ranks.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from . import data as data_module
from .backend import BACKENDS, set_backend
from .data import SeriesData

CHECKPOINT_FORMAT = 1
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s")

# Settings fixed by a checkpoint: resuming with other values would not continue the same run. They set the
# optimiser, the schedule, the loss, the data order and the numerics (amp); ``model_config`` (the caller's
# description of the model and data) and ``model_repr`` (the model's module tree, dropout rates included) too.
_RESUME_KEYS = ("epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "steps_per_epoch",
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


# ----------------------------------------------------------------------------------------------- helpers


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


def as_series_data(value, what: str) -> SeriesData:
    """A SeriesData, or a tuple (x, y) / (x, y, lengths) of tensors, as a SeriesData."""
    if isinstance(value, SeriesData):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return data_module.from_tensors(*value)
    raise TypeError(f"{what} must be a fastmsc.data.SeriesData or a tuple (x, y[, lengths]), "
                    f"got {type(value).__name__}")


def balanced_class_weights(train: SeriesData) -> torch.Tensor:
    """(K,) weights N / (K * count_k), so every class weighs the same in the loss; absent classes get 0."""
    counts = train.class_counts().double()
    weights = len(train) / (train.num_classes * counts.clamp_min(1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases and norm scales (1-D parameters) are not decayed. Fused on CUDA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True if device.type == "cuda" else None)


def make_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
    """Cosine annealing over the steps after a linear warm-up (from lr/warmup_steps up to lr); stepped per
    optimizer step."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps),
                                                        eta_min=min_lr)
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0,
                                               total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def _batches(data: SeriesData, indices: list[int], batch_size: int, device: torch.device, dtype: torch.dtype):
    """Yield (x (B, C, T_batch), y (B,), lengths (B,) | None); T_batch trims padding past the batch's longest."""
    for start in range(0, len(indices), batch_size):
        index = torch.tensor(indices[start:start + batch_size], dtype=torch.int64, device=data.x.device)
        x, y = data.x.index_select(0, index), data.y.index_select(0, index)
        lengths = None
        if data.lengths is not None:
            lengths = data.lengths.index_select(0, index)
            x = x[:, :, : int(lengths.max())]
        yield (x.to(device=device, dtype=dtype, non_blocking=True), y.to(device, non_blocking=True),
               None if lengths is None else lengths.to(device, non_blocking=True))


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    if distributed_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def loss_input(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16/fp16 (autocast) upcast to float32; float32 and float64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256, device=None, criterion=None, amp: bool = True) -> dict:
    """Mean loss and accuracy of ``model`` on ``data``; {'loss', 'accuracy', 'count'}.

    Under a process group each rank scores every world_size-th series and the sums are all-reduced.
    ``criterion`` defaults to plain cross-entropy.
    """
    data = as_series_data(data, "data")
    device = next(model.parameters()).device if device is None else torch.device(device)
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    rank, world = distributed_world()
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for x, y, lengths in _batches(data, list(range(rank, len(data), world)), batch_size, device, _param_dtype(model)):
        with _autocast(device, amp):
            logits = model(x, lengths)
        loss_sum += float(criterion(loss_input(logits), y)) * y.shape[0]
        correct += float((logits.argmax(dim=1) == y).sum())
        count += y.shape[0]
    model.train(was_training)
    loss_sum, correct, count = _all_reduce_sums([loss_sum, correct, count], device)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": int(count)}


# ------------------------------------------------------------------------------------------- checkpoints


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


def replace_atomically(path, write) -> None:
    """Write ``path`` as ``write(tmp)`` into a temporary file renamed over it: a reader (or a run killed
    mid-write) never sees half a file.

    The temporary file (``NAME.<pid>.<random>.tmp`` beside ``path``) is unique per process and call, so
    concurrent writers of one path do not collide: each rename is whole and the last one wins. It is created
    empty, with the permissions of a new file (umask applied), and removed if ``write`` or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_csv(path, columns, rows) -> None:
    """One line per row (dicts); missing and None values are written as empty fields."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})

    replace_atomically(path, write)


def _atomic_save(obj, path: Path) -> None:
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`fit` (tensors, numbers and strings only: loads with weights_only)."""
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


def _check_resume(path, saved: dict, config: dict) -> None:
    """Raise :class:`CheckpointMismatch` unless the checkpoint's settings are this run's."""
    missing = [k for k in _RESUME_KEYS_ADDED if k not in saved]
    if missing:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint predates the check that the model and "
                              f"data settings are unchanged (it records no {', '.join(missing)}); start a new run")
    different = {k: (saved.get(k), config[k]) for k in _RESUME_KEYS if saved.get(k) != config[k]}
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


# ----------------------------------------------------------------------------------------------- metrics


def _write_metrics(history: list[dict], config: dict, meta: dict, json_path, csv_path) -> None:
    if json_path:
        final = history[-1] if history else {}
        config = {k: v for k, v in config.items() if k != "model_repr"}  # in the checkpoint only: many lines
        write_json(json_path, {"meta": meta, "config": config, "epochs": history, "final": final})
    if csv_path:
        write_csv(csv_path, METRIC_COLUMNS, history)


def _format_epoch(row: dict, epochs: int) -> str:
    text = (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.4f}  "
            f"train acc {row['train_acc']:.4f}")
    if row.get("test_acc") is not None:
        text += f"  test loss {row['test_loss']:.4f}  test acc {row['test_acc']:.4f}"
    return text + f"  ({row['epoch_time_s']:.1f}s)"


# --------------------------------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch metrics and the trained (unwrapped) model."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    epochs_done: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def fit(model: nn.Module, train_data, test_data=None, *, epochs: int = 100, batch_size: int = 8, lr: float = 1e-3,
        min_lr: float = 0.0, weight_decay: float = 0.05, warmup_epochs: float = 0.0, label_smoothing: float = 0.1,
        class_weights=None, grad_clip: float | None = 1.0, device=None, seed: int = 0, amp: bool = True,
        eval_every: int = 1, eval_batch_size: int = 256, progress: bool | None = None, log=print,
        metrics_json=None, metrics_csv=None, checkpoint=None, resume=None, stop_after: int | None = None,
        meta: dict | None = None, model_config: dict | None = None) -> FitResult:
    """Train ``model`` on ``train_data`` and score it on ``test_data`` after every ``eval_every`` epochs.

    * AdamW (fused on CUDA; 1-D parameters not decayed), CosineAnnealingLR from ``lr`` to ``min_lr`` stepped per
      optimizer step after a linear warm-up of ``warmup_epochs`` epochs (may be fractional).
    * Cross-entropy with ``label_smoothing`` and ``class_weights`` ((K,) tensor, or ``"balanced"``); the gradient
      norm is clipped to ``grad_clip`` (None or 0: off); bf16 autocast when ``amp`` and the device is CUDA.
    * ``seed`` fixes the batch order (epoch e shuffles with seed + e, as DistributedSampler does) and dropout
      (the global torch RNG is seeded with seed + rank; the model's initialisation is the caller's).
    * ``checkpoint``: a path rewritten after every epoch with the model, optimizer, scheduler, RNG states of
      every rank, epoch and metrics; ``resume``: such a path to continue from. The run's settings must match the
      checkpoint's (else :class:`CheckpointMismatch` names each that differs): the optimiser, schedule, loss,
      data order and amp arguments, the training set's size, ``model_config`` (the caller's description of the
      model and data, e.g. its constructor's arguments; numbers, strings, booleans, lists) and the model's
      module tree (``repr(model)``, which shows dropout rates). Checkpoints written before this check covered
      the model and data lack those records and are refused (:class:`CheckpointError`). ``stop_after``: end
      this call after that epoch (the schedule still spans ``epochs``), e.g. to resume later; resuming gives
      the same parameters as one uninterrupted run.
    * ``metrics_json`` / ``metrics_csv``: per-epoch metrics rewritten after every epoch. ``train_loss`` is the
      training objective (with smoothing and class weights) averaged over the epoch's batches; ``test_loss`` is
      plain cross-entropy, comparable across settings.
    * Under an initialised process group with world size > 1 the model is wrapped in DistributedDataParallel;
      ``batch_size`` is per rank. Only rank 0 writes files and logs.
    * ``progress``: a tqdm bar per epoch (default: when stderr is a terminal); ``log``: called with one line per
      epoch (None: silent).
    """
    train = as_series_data(train_data, "train_data")
    test = None if test_data is None else as_series_data(test_data, "test_data")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    numbers = (lr, min_lr, weight_decay, label_smoothing, warmup_epochs, 0.0 if grad_clip is None else grad_clip)
    if (not all(math.isfinite(v) for v in numbers) or not lr > 0 or min_lr < 0 or weight_decay < 0
            or not 0 <= label_smoothing < 1 or warmup_epochs < 0 or (grad_clip is not None and grad_clip < 0)):
        raise ValueError(f"need finite numbers with lr > 0, min_lr >= 0, weight_decay >= 0, 0 <= label_smoothing < 1, "
                         f"warmup_epochs >= 0 and grad_clip >= 0 or None; got lr={lr}, min_lr={min_lr}, "
                         f"weight_decay={weight_decay}, label_smoothing={label_smoothing}, "
                         f"warmup_epochs={warmup_epochs}, grad_clip={grad_clip}")
    if stop_after is not None and not 1 <= stop_after <= epochs:
        raise ValueError(f"stop_after must be in [1, epochs={epochs}], got {stop_after}")
    if test is not None and test.num_channels != train.num_channels:
        raise ValueError(f"test_data has {test.num_channels} channels but train_data has {train.num_channels}")

    device = resolve_device(device)
    rank, world = distributed_world()
    is_main = rank == 0
    model = model.to(device)
    dtype = _param_dtype(model)
    for what, split in (("train_data", train), ("test_data", test)):
        bad = None if split is None else ~torch.isfinite(split.x.to(dtype))
        if bad is not None and bool(bad.any()):
            i, c, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{what} holds a non-finite value once in the model's dtype {dtype}: series {i}, "
                             f"channel {c}, step {t} is {float(split.x[i, c, t])!r}")
    train_on = SeriesData(train.x.to(device), train.y.to(device),
                          None if train.lengths is None else train.lengths.to(device), train.classes, train.name)
    test_on = None if test is None else SeriesData(
        test.x.to(device), test.y.to(device), None if test.lengths is None else test.lengths.to(device),
        test.classes, test.name)

    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be a (K,) tensor, a sequence of K numbers or 'balanced', "
                             f"got {class_weights!r}")
        class_weights = balanced_class_weights(train)
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape != (train.num_classes,) or bool((class_weights < 0).any()):
            raise ValueError(f"class_weights must hold {train.num_classes} non-negative numbers (one per class), "
                             f"got shape {tuple(class_weights.shape)}")
        class_weights = class_weights.to(device)
    criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    optimizer = make_optimizer(model, lr, weight_decay, device)
    scheduler = make_scheduler(optimizer, epochs * steps_per_epoch, warmup_steps, min_lr)
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay,
              "warmup_epochs": warmup_epochs, "steps_per_epoch": steps_per_epoch, "world_size": world, "seed": seed,
              "label_smoothing": label_smoothing, "grad_clip": grad_clip,
              "class_weights": None if class_weights is None else class_weights.tolist(),
              "amp": bool(amp and device.type == "cuda"), "device": str(device), "train_size": len(train),
              "model_config": None if model_config is None else dict(model_config), "model_repr": repr(model)}
    meta = dict(meta or {})

    raw_model = model
    start_epoch, history = 0, []
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        _check_resume(resume, state["config"], config)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        rng_states = state["rng"]
        _set_rng_state(rng_states[rank] if len(rng_states) == world else rng_states[0])
        if len(rng_states) != world:
            torch.manual_seed(seed + rank + 1000 * start_epoch)  # ranks need distinct dropout streams
    else:
        torch.manual_seed(seed + rank)

    if world > 1:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    show_progress = (sys.stderr.isatty() if progress is None else progress) and is_main
    if show_progress:
        from tqdm import tqdm
    last_epoch = epochs if stop_after is None else stop_after
    started = time.perf_counter()
    for epoch in range(start_epoch, last_epoch):
        epoch_started = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        indices = list(sampler)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   dynamic_ncols=True) if show_progress else None
        loss_sum = correct = count = 0.0
        for x, y, lengths in _batches(train_on, indices, batch_size, device, dtype):
            with _autocast(device, amp):
                logits = model(x, lengths)
            loss = criterion(loss_input(logits), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * y.shape[0]
            correct += float((logits.detach().argmax(dim=1) == y).sum())
            count += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}")
        if bar is not None:
            bar.close()
        loss_sum, correct, count = _all_reduce_sums([loss_sum, correct, count], device)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / count,
               "train_acc": correct / count, "test_loss": None, "test_acc": None}
        if test_on is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            # The unwrapped model: ranks score different numbers of batches, so no DDP collective may run.
            scores = evaluate(raw_model, test_on, eval_batch_size, device, None, amp)
            row["test_loss"], row["test_acc"] = scores["loss"], scores["accuracy"]
        row["epoch_time_s"] = time.perf_counter() - epoch_started
        history.append(row)
        if checkpoint is not None:
            rng_states = _gather_rng_states()  # a collective: every rank takes part
            if is_main:
                _atomic_save({"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "model": raw_model.state_dict(),
                              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                              "rng": rng_states, "history": history, "config": config, "meta": meta},
                             Path(checkpoint))
        if is_main:
            _write_metrics(history, config, meta, metrics_json, metrics_csv)
            if log is not None:
                log(_format_epoch(row, epochs))
    return FitResult(raw_model, history, len(history), time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("data (default: the built-in synthetic dataset)")
    choice = source.add_mutually_exclusive_group()
    choice.add_argument("--data", metavar="DIR", help="folder holding NAME_TRAIN and NAME_TEST (.ts or .tsv)")
    choice.add_argument("--dataset", metavar="NAME",
                        help="dataset searched in $FASTMSC_DATA, then in the data bundled with aeon or sktime")
    source.add_argument("--name", help="with --data: which dataset of the folder (default: the folder's name)")
    source.add_argument("--znorm", action="store_true", help="z-normalise each series and channel (off: UCR data "
                                                             "is normalised already)")
    source.add_argument("--synthetic-train", type=int, default=240, metavar="N", help="synthetic training series")
    source.add_argument("--synthetic-test", type=int, default=240, metavar="N", help="synthetic test series")
    source.add_argument("--synthetic-length", type=int, default=96, metavar="T", help="synthetic series length")
    source.add_argument("--synthetic-classes", type=int, default=4, metavar="K", help="synthetic classes")
    source.add_argument("--synthetic-variable-length", action="store_true",
                        help="synthetic series of lengths in [T/2, T], zero padded")

    model = parser.add_argument_group("model (fastmsc.models.MSCClassifier)")
    model.add_argument("--conv-channels", type=int, default=32, help="channels of each conv branch")
    model.add_argument("--lstm-hidden", type=int, default=64, help="LSTM hidden size per direction")
    model.add_argument("--lstm-layers", type=int, default=1)
    model.add_argument("--heads", type=int, default=1, help="attention heads")
    model.add_argument("--classifier-hidden", type=int, default=64)
    model.add_argument("--dropout", type=float, default=0.3)
    model.add_argument("--no-conv-norm", dest="conv_norm", action="store_false",
                       help="no BatchNorm after the conv branches")
    model.add_argument("--sync-bn", action="store_true",
                       help="under DDP on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm)")

    # Defaults measured on GunPoint (50 training series) and JapaneseVowels: batches of 8 give enough optimizer
    # steps on small training sets; label smoothing, dropout 0.3 and weight decay 0.05 steady the test accuracy
    # across seeds (without them GunPoint ranged 0.91-0.97 over seeds, with them 0.96-0.99).
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=100)
    optim.add_argument("--batch-size", type=int, default=8, help="series per batch (per process under torchrun)")
    optim.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    optim.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up length (may be fractional)")
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--class-weights", metavar="W",
                       help="'balanced', or K comma-separated weights, one per class in label order")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")

    optim.add_argument("--ensemble", type=int, default=3, metavar="M",
                       help="train M independently seeded models and average their class probabilities (1: a "
                            "single model); member m uses seed + 1000*m")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    runtime.add_argument("--backend", default="auto", choices=BACKENDS, help="fastmsc op backend")
    runtime.add_argument("--seed", type=int, default=0)
    runtime.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    runtime.add_argument("--threads", type=int, default=1,
                         help="torch's CPU threads (0: torch's default). 1 by default: the model's small matrix "
                              "products run fastest, in CPU time too, on one thread")
    runtime.add_argument("--eval-every", type=int, default=1, metavar="E", help="score the test split every E epochs")
    runtime.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")

    output = parser.add_argument_group("output")
    output.add_argument("--metrics-json", metavar="PATH", help="write per-epoch metrics as JSON")
    output.add_argument("--metrics-csv", metavar="PATH", help="write per-epoch metrics as CSV")
    output.add_argument("--checkpoint", metavar="PATH", help="save a resumable checkpoint after every epoch")
    output.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    output.add_argument("--stop-after", type=int, metavar="E",
                        help="end after epoch E (resume later with --resume); with --ensemble, epochs count over the "
                             "members one after the other, up to M times --epochs")


def _load_data(args) -> tuple[SeriesData, SeriesData]:
    if args.data:
        return data_module.load_split(args.data, args.name, args.znorm)
    if args.dataset:
        return data_module.load_dataset(args.dataset, args.znorm)
    train, test = data_module.synthetic(args.synthetic_train, args.synthetic_test, args.synthetic_length,
                                        args.synthetic_classes, variable_length=args.synthetic_variable_length,
                                        seed=args.seed)
    if args.znorm:
        train, test = data_module.znormalise_series(train), data_module.znormalise_series(test)
    return train, test


def _class_weights_arg(text: str | None, num_classes: int):
    if text is None or text == "balanced":
        return text
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if (len(weights) != num_classes or not all(math.isfinite(w) and w >= 0 for w in weights)
            or not any(w > 0 for w in weights)):
        raise UsageError(f"--class-weights must be 'balanced' or {num_classes} comma-separated finite numbers >= 0 "
                         f"(one per class, not all 0), got {text!r}")
    return weights


class UsageError(ValueError):
    """A mistake in the ``fastmsc train`` command line or in what it names (data, checkpoint): :func:`main`
    prints it as one line ``fastmsc train: error: ...`` and exits with status 2, as argparse does."""


# Range checks of ``fastmsc train``'s numeric options. Integers: (option, lowest value). Floats, which must also be
# finite: (option, lowest value, whether the lowest is excluded, excluded upper bound or None).
_INT_OPTIONS = (("synthetic_train", 1), ("synthetic_test", 1), ("synthetic_length", 16), ("synthetic_classes", 2),
                ("conv_channels", 1), ("lstm_hidden", 1), ("lstm_layers", 1), ("heads", 1), ("classifier_hidden", 1),
                ("epochs", 1), ("batch_size", 1), ("ensemble", 1), ("threads", 0), ("eval_every", 1))
_FLOAT_OPTIONS = (("dropout", 0.0, False, 1.0), ("lr", 0.0, True, None), ("min_lr", 0.0, False, None),
                  ("weight_decay", 0.0, False, None), ("warmup_epochs", 0.0, False, None),
                  ("label_smoothing", 0.0, False, 1.0), ("grad_clip", 0.0, False, None))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_arguments(args) -> None:
    """Raise :class:`UsageError` for the first numeric option out of its range (or not finite)."""
    for dest, low in _INT_OPTIONS:
        value = getattr(args, dest)
        if value < low:
            raise UsageError(f"{_flag(dest)} must be an integer >= {low}, got {value}")
    for dest, low, low_open, high in _FLOAT_OPTIONS:
        value = getattr(args, dest)
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None
                                                                                      and value >= high):
            if high is not None:
                wanted = f"in [{low:g}, {high:g})"
            else:
                wanted = f"{'>' if low_open else '>='} {low:g}"
            note = " (0: off)" if dest == "grad_clip" else ""
            raise UsageError(f"{_flag(dest)} must be a finite number {wanted}{note}, got {value:g}")
    if args.min_lr > args.lr:
        raise UsageError(f"--min-lr must be <= --lr (the cosine falls from --lr to --min-lr), got --min-lr "
                         f"{args.min_lr:g} and --lr {args.lr:g}")
    if (2 * args.lstm_hidden) % args.heads:
        raise UsageError(f"--heads must divide 2 * --lstm-hidden = {2 * args.lstm_hidden} (the attention's width), "
                         f"got {args.heads}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.ensemble * args.epochs:
        raise UsageError(f"--stop-after must be in [1, --ensemble * --epochs = {args.ensemble * args.epochs}], "
                         f"got {args.stop_after}")


def _resume_error(exc: CheckpointError) -> UsageError:
    """A CheckpointMismatch with the command's option names, else the checkpoint problem as it is."""
    if not isinstance(exc, CheckpointMismatch):
        return UsageError(str(exc))
    names = {"steps_per_epoch": "steps per epoch (from --batch-size, the data and the process count)",
             "world_size": "number of processes", "train_size": "number of training series",
             "amp": "bf16 autocast (--no-amp, CUDA only)", "model": "model", "num_channels": "number of channels",
             "classes": "classes", "dataset": "dataset", "conv_norm": "conv norm (--no-conv-norm)"}
    listed = "; ".join(f"{names.get(k, _flag(k))} is {b!r} but the checkpoint has {a!r}"
                       for k, (a, b) in exc.differences.items())
    return UsageError(f"cannot resume from {exc.path}: {listed}")


def main(args) -> int:
    """``run(args)`` with user errors (:class:`UsageError`) printed as one line, exit status 2."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"fastmsc train: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    """``fastmsc train``; raises :class:`UsageError` for a mistake in the command line (see :func:`main`)."""
    from .ensemble import fit_ensemble
    from .models import MSCClassifier

    check_arguments(args)
    set_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = resolve_device(args.device)
    except ValueError as exc:  # CUDA asked for but absent
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:  # torch cannot parse the name
        raise UsageError(f"--device {args.device!r}: {exc}") from None
    if world_env > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = distributed_world()
    try:
        try:
            train, test = _load_data(args)
        except (OSError, ValueError) as exc:  # missing or malformed files, an unknown dataset: the user's to fix
            raise UsageError(str(exc)) from None
        if train.num_classes < 2:
            raise UsageError(f"the training data has {train.num_classes} class(es); a classifier needs at least 2")
        class_weights = _class_weights_arg(args.class_weights, train.num_classes)
        if args.sync_bn and device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")

        def make_model() -> nn.Module:
            # fit_ensemble seeds torch first: the same initial weights on every rank (DDP also broadcasts rank 0's)
            model = MSCClassifier(train.num_channels, train.num_classes, conv_channels=args.conv_channels,
                                  lstm_hidden=args.lstm_hidden, lstm_layers=args.lstm_layers, num_heads=args.heads,
                                  classifier_hidden=args.classifier_hidden, dropout=args.dropout,
                                  conv_norm=args.conv_norm)
            return nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model

        name = train.name or "synthetic"
        meta = {"dataset": name, "classes": list(train.classes), "num_channels": train.num_channels,
                "train_size": len(train), "test_size": len(test), "backend": args.backend,
                "model": {"conv_channels": args.conv_channels, "lstm_hidden": args.lstm_hidden,
                          "lstm_layers": args.lstm_layers, "num_heads": args.heads,
                          "classifier_hidden": args.classifier_hidden, "dropout": args.dropout,
                          "conv_norm": args.conv_norm}}
        # What the checkpoint records of the model and data; resuming with other values is refused by name.
        model_config = {**meta["model"], "heads": meta["model"]["num_heads"], "sync_bn": args.sync_bn,
                        "dataset": name, "classes": list(train.classes), "num_channels": train.num_channels,
                        "znorm": args.znorm}
        del model_config["num_heads"]
        if not (args.data or args.dataset):
            model_config.update({k: getattr(args, k) for k in ("synthetic_train", "synthetic_test",
                                                               "synthetic_length", "synthetic_classes",
                                                               "synthetic_variable_length")})
        log = None if args.quiet or rank != 0 else print
        if log is not None:
            lengths = train.series_lengths()
            parameters = sum(p.numel() for p in make_model().parameters())
            members = f", an ensemble of {args.ensemble} models" if args.ensemble > 1 else ""
            log(f"{name}: {len(train)} train / {len(test)} test series, {train.num_channels} channel(s), "
                f"lengths {int(lengths.min())}-{int(lengths.max())}, {train.num_classes} classes; device {device}, "
                f"{world} process(es), {parameters} parameters per model{members}")
        cpu_started = time.process_time()
        try:
            result = fit_ensemble(
                make_model, train, test, members=args.ensemble, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                label_smoothing=args.label_smoothing, class_weights=class_weights, grad_clip=args.grad_clip,
                device=device, seed=args.seed, amp=args.amp, eval_every=args.eval_every,
                progress=False if args.quiet else None, log=log, metrics_json=args.metrics_json,
                metrics_csv=args.metrics_csv, checkpoint=args.checkpoint, resume=args.resume,
                stop_after=args.stop_after, meta=meta, model_config=model_config)
        except CheckpointError as exc:
            raise _resume_error(exc) from None
        if rank == 0:
            cpu = time.process_time() - cpu_started
            if args.ensemble > 1:
                accuracies = ", ".join("n/a" if r.final.get("test_acc") is None else f"{r.final['test_acc']:.4f}"
                                       for r in result.members)
                print(f"{name}: member test accuracies {accuracies}")
            final = result.final if result.complete else result.members[-1].final
            what = f"ensemble of {args.ensemble}" if args.ensemble > 1 and result.complete else None
            if args.ensemble > 1 and not result.complete:
                what = f"member {len(result.members)}/{args.ensemble}"
            test_acc = "n/a" if final.get("test_acc") is None else f"{final['test_acc']:.4f}"
            print(f"{name}: test accuracy {test_acc}{f' ({what})' if what else ''} after epoch "
                  f"{final.get('epoch', 0)}/{args.epochs} ({result.seconds:.1f}s wall, {cpu:.1f}s CPU in this process)")
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0
