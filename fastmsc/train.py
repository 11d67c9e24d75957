"""Training: :func:`fit` (AdamW, cosine LR per step with optional warm-up, cross-entropy, gradient clipping,
bf16 autocast on CUDA, metrics files, resumable checkpoints, DistributedDataParallel) and :func:`evaluate`.

Data are :class:`fastmsc.data.SeriesData` (or tuples ``(x, y)`` / ``(x, y, lengths)``): x (N, C, T) float32,
y (N,) int64 in 0..K-1, lengths (N,) int64 or None. Each batch keeps its lengths, so the model is called as
``model(x (B, C, T_batch), lengths (B,) | None) -> logits (B, K)``, with T_batch the longest series in the batch.

Scale-out: under ``torchrun --nproc_per_node N -m fastmsc train ...`` (WORLD_SIZE > 1 in the environment)
the command initialises the process group (gloo on CPU, nccl on CUDA) and :func:`fit` wraps the model in
DistributedDataParallel and shards each epoch with a DistributedSampler: a global batch is ``batch_size *
world_size`` series, gradients are averaged over ranks.

Checkpoints are :mod:`fastmsc.checkpoint`'s, metrics files :mod:`fastmsc.metrics`'; the names users of this module
import from it (``load_checkpoint``, the checkpoint errors, ``METRIC_COLUMNS``, ``write_json`` ...) are kept here.
The command line ``fastmsc train`` is :mod:`fastmsc.commands.train`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from . import data as data_module
from ._distributed import all_reduce_sums, distributed_world, resolve_device
from ._files import replace_atomically, write_csv, write_json
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointMismatch,
    MissingCheckpointError,
    check_resume,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from .data import SeriesData
from .metrics import METRIC_COLUMNS, format_epoch, write_metrics

__all__ = [
    "CHECKPOINT_FORMAT", "METRIC_COLUMNS", "CheckpointError", "CheckpointMismatch", "FitResult",
    "MissingCheckpointError", "as_series_data", "balanced_class_weights", "distributed_world", "evaluate", "fit",
    "load_checkpoint", "loss_input", "make_optimizer", "make_scheduler", "replace_atomically", "resolve_device",
    "write_csv", "write_json",
]


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
    loss_sum, correct, count = all_reduce_sums([loss_sum, correct, count], device)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "count": int(count)}


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
    _check_settings(epochs=epochs, batch_size=batch_size, eval_every=eval_every, lr=lr, min_lr=min_lr,
                    weight_decay=weight_decay, label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
                    grad_clip=grad_clip, stop_after=stop_after)
    if test is not None and test.num_channels != train.num_channels:
        raise ValueError(f"test_data has {test.num_channels} channels but train_data has {train.num_channels}")

    run = _setup(model, train, test, device=device, epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr,
                 weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                 class_weights=class_weights, grad_clip=grad_clip, seed=seed, amp=amp, model_config=model_config)
    meta = dict(meta or {})
    start_epoch, history = _resume_or_seed(run, resume, seed)
    rank, world = distributed_world()
    if world > 1:
        ddp_kwargs = {"device_ids": [run.device.index]} if run.device.type == "cuda" else {}
        run.model = nn.parallel.DistributedDataParallel(run.model, **ddp_kwargs)

    is_main = rank == 0
    show_progress = (sys.stderr.isatty() if progress is None else progress) and is_main
    if show_progress:
        from tqdm import tqdm
    progress_bar = tqdm if show_progress else None
    last_epoch = epochs if stop_after is None else stop_after
    started = time.perf_counter()
    for epoch in range(start_epoch, last_epoch):
        epoch_started = time.perf_counter()
        row = _train_epoch(run, epoch, epochs, batch_size, amp, grad_clip, progress_bar)
        if run.test is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            # The unwrapped model: ranks score different numbers of batches, so no DDP collective may run.
            scores = evaluate(run.raw_model, run.test, eval_batch_size, run.device, None, amp)
            row["test_loss"], row["test_acc"] = scores["loss"], scores["accuracy"]
        row["epoch_time_s"] = time.perf_counter() - epoch_started
        history.append(row)
        if checkpoint is not None:
            save_checkpoint(checkpoint, epoch=epoch + 1, model=run.raw_model, optimizer=run.optimizer,
                            scheduler=run.scheduler, history=history, config=run.config, meta=meta)
        if is_main:
            write_metrics(history, run.config, meta, metrics_json, metrics_csv)
            if log is not None:
                log(format_epoch(row, epochs))
    return FitResult(run.raw_model, history, len(history), time.perf_counter() - started)


# ------------------------------------------------------------------------------------------- fit's steps


def _check_settings(*, epochs, batch_size, eval_every, lr, min_lr, weight_decay, label_smoothing, warmup_epochs,
                    grad_clip, stop_after) -> None:
    """Raise ValueError for the first of fit's counts or numbers out of its range."""
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


def _check_finite(splits: dict, dtype: torch.dtype) -> None:
    """Raise ValueError naming the first value of a split (name -> SeriesData or None) that is not finite
    once cast to the model's dtype (a float32 value beyond float16's range, say)."""
    for what, split in splits.items():
        bad = None if split is None else ~torch.isfinite(split.x.to(dtype))
        if bad is not None and bool(bad.any()):
            i, c, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{what} holds a non-finite value once in the model's dtype {dtype}: series {i}, "
                             f"channel {c}, step {t} is {float(split.x[i, c, t])!r}")


def _on_device(split: SeriesData | None, device: torch.device) -> SeriesData | None:
    """The split with its tensors on ``device``, so batches are gathered there."""
    if split is None:
        return None
    return SeriesData(split.x.to(device), split.y.to(device),
                      None if split.lengths is None else split.lengths.to(device), split.classes, split.name)


def _class_weight_tensor(class_weights, train: SeriesData, device: torch.device) -> torch.Tensor | None:
    """fit's ``class_weights`` (None, ``"balanced"``, or K numbers) as a (K,) float32 tensor on ``device``."""
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be a (K,) tensor, a sequence of K numbers or 'balanced', "
                             f"got {class_weights!r}")
        class_weights = balanced_class_weights(train)
    if class_weights is None:
        return None
    class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
    if class_weights.shape != (train.num_classes,) or bool((class_weights < 0).any()):
        raise ValueError(f"class_weights must hold {train.num_classes} non-negative numbers (one per class), "
                         f"got shape {tuple(class_weights.shape)}")
    return class_weights.to(device)


@dataclass
class _Run:
    """What one :func:`fit` call trains with. ``model`` is ``raw_model`` or, under a process group, its
    DistributedDataParallel wrapper; ``train`` / ``test`` are on ``device``; ``config`` is what a checkpoint
    records and a resumed run must repeat (see :func:`fastmsc.checkpoint.check_resume`)."""

    model: nn.Module
    raw_model: nn.Module
    train: SeriesData
    test: SeriesData | None
    device: torch.device
    dtype: torch.dtype
    criterion: nn.Module
    sampler: DistributedSampler
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    config: dict


def _setup(model: nn.Module, train: SeriesData, test: SeriesData | None, *, device, epochs, batch_size, lr, min_lr,
           weight_decay, warmup_epochs, label_smoothing, class_weights, grad_clip, seed, amp, model_config) -> _Run:
    """Move the model and data to the device, check the data, build the loss, sampler, optimizer and schedule."""
    device = resolve_device(device)
    rank, world = distributed_world()
    model = model.to(device)
    dtype = _param_dtype(model)
    _check_finite({"train_data": train, "test_data": test}, dtype)
    train_on, test_on = _on_device(train, device), _on_device(test, device)
    weights = _class_weight_tensor(class_weights, train, device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    optimizer = make_optimizer(model, lr, weight_decay, device)
    scheduler = make_scheduler(optimizer, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch), min_lr)
    config = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay,
              "warmup_epochs": warmup_epochs, "steps_per_epoch": steps_per_epoch, "world_size": world, "seed": seed,
              "label_smoothing": label_smoothing, "grad_clip": grad_clip,
              "class_weights": None if weights is None else weights.tolist(),
              "amp": bool(amp and device.type == "cuda"), "device": str(device), "train_size": len(train),
              "model_config": None if model_config is None else dict(model_config), "model_repr": repr(model)}
    return _Run(model, model, train_on, test_on, device, dtype, criterion, sampler, steps_per_epoch, optimizer,
                scheduler, config)


def _resume_or_seed(run: _Run, resume, seed: int) -> tuple[int, list[dict]]:
    """(epochs done, their metric rows): restored from the checkpoint ``resume`` (model, optimizer, schedule and
    RNG states too), or (0, []) with torch seeded ``seed + rank`` for a new run."""
    if resume is None:
        torch.manual_seed(seed + distributed_world()[0])
        return 0, []
    state = load_checkpoint(resume, map_location=run.device)
    check_resume(resume, state["config"], run.config)
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    start_epoch = int(state["epoch"])
    restore_rng_states(state["rng"], seed, start_epoch)
    return start_epoch, list(state["history"])


def _train_epoch(run: _Run, epoch: int, epochs: int, batch_size: int, amp: bool, grad_clip, progress_bar) -> dict:
    """One pass over this rank's shard of the training data (order: the sampler's for ``epoch``), one optimizer
    and scheduler step per batch. Returns the metric row without its test scores and time: ``epoch`` (counted
    from 1), ``lr`` after the epoch, ``train_loss`` and ``train_acc`` over every rank's batches.
    ``progress_bar``: tqdm's class for a bar over the epoch's batches, or None."""
    run.model.train()
    run.sampler.set_epoch(epoch)
    indices = list(run.sampler)
    bar = None if progress_bar is None else progress_bar(
        total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
    loss_sum = correct = count = 0.0
    for x, y, lengths in _batches(run.train, indices, batch_size, run.device, run.dtype):
        with _autocast(run.device, amp):
            logits = run.model(x, lengths)
        loss = run.criterion(loss_input(logits), y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        loss_sum += float(loss.detach()) * y.shape[0]
        correct += float((logits.detach().argmax(dim=1) == y).sum())
        count += y.shape[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
        bar.close()
    loss_sum, correct, count = all_reduce_sums([loss_sum, correct, count], run.device)
    return {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / count,
            "train_acc": correct / count, "test_loss": None, "test_acc": None}
