"""Training ensembles of independently trained models: :func:`fit_ensemble` (``fastmsc train --ensemble M``); the
module that averages them is :class:`fastmsc.models.Ensemble`.

On small training sets (GunPoint has 50 series) every run fits the training data exactly and the test accuracy
depends on which of many exact fits a seed lands in; averaging the class probabilities of a few independently
seeded models removes most of that variance at a cost linear in the number of members.

Member ``m`` of a run with seed ``s`` is initialised and trained with seed ``s + 1000 * m``, so member 0 is exactly
the single model of seed ``s``. Members train one after the other with :func:`fastmsc.train.fit`; each has its own
checkpoint and metrics files (``NAME.member<m>.EXT`` next to the paths given), and the given paths receive the
ensemble's summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import train as train_module
from ._files import write_csv, write_json
from .metrics import METRIC_COLUMNS
from .models import Ensemble

MEMBER_SEED_STRIDE = 1000


def member_seed(seed: int, member: int) -> int:
    return seed + MEMBER_SEED_STRIDE * member


def member_path(path, member: int, members: int) -> Path | None:
    """Where member ``member`` keeps the file given as ``path``: the path itself for a single model."""
    if path is None:
        return None
    path = Path(path)
    return path if members == 1 else path.with_name(f"{path.stem}.member{member}{path.suffix}")


@dataclass
class EnsembleResult:
    """What :func:`fit_ensemble` returns. ``final`` holds the ensemble's test loss and accuracy (when scored)."""

    model: nn.Module
    members: list = field(default_factory=list)  # one fastmsc.train.FitResult per member trained or restored
    final: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return bool(self.final)


def fit_ensemble(make_model: Callable[[], nn.Module], train_data, test_data=None, *, members: int = 3,
                 seed: int = 0, epochs: int = 100, checkpoint=None, resume=None, metrics_json=None,
                 metrics_csv=None, stop_after: int | None = None, log=print, meta: dict | None = None,
                 eval_batch_size: int = 256, amp: bool = True, device=None, **fit_kwargs) -> EnsembleResult:
    """Train ``members`` models made by ``make_model()`` (called right after seeding torch with the member's
    seed) with :func:`fastmsc.train.fit`, one after the other, then score the ensemble on ``test_data``.

    ``checkpoint`` / ``resume`` / ``metrics_json`` / ``metrics_csv`` are the paths of the whole run; member m
    uses them with ``.member<m>`` before the extension (a single member uses them as given, exactly like
    ``fit``). Resuming restores finished members, continues the one that was interrupted and trains the rest.
    ``stop_after`` ends the run after that many epochs counted over the members one after the other (member m's
    epoch e is the run's epoch ``m * epochs + e``). Other keyword arguments go to ``fit`` unchanged. With one
    member the result is exactly ``fit``'s, the ensemble being that model. The result's ``final`` is empty
    until every member has finished.
    """
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise ValueError(f"members must be an int >= 1, got {members!r}")
    if stop_after is not None and not 1 <= stop_after <= members * epochs:
        raise ValueError(f"stop_after must be in [1, members * epochs = {members * epochs}], got {stop_after}")
    started = time.perf_counter()
    rank, _ = train_module.distributed_world()
    done = []
    for m in range(members):
        if stop_after is not None and stop_after <= m * epochs:
            break
        member_stop = None if stop_after is None or stop_after >= (m + 1) * epochs else stop_after - m * epochs
        seed_m = member_seed(seed, m)
        resume_m = member_path(resume, m, members)
        if resume_m is not None and m > 0 and not resume_m.exists():
            resume_m = None  # the interrupted run had not started this member yet
        if log is not None and members > 1:
            log(f"member {m + 1}/{members} (seed {seed_m})")
        torch.manual_seed(seed_m)
        model = make_model()
        member_meta = {**(meta or {}), "member": m, "members": members, "member_seed": seed_m}
        result = train_module.fit(
            model, train_data, test_data, epochs=epochs, seed=seed_m, checkpoint=member_path(checkpoint, m, members),
            resume=resume_m, metrics_json=member_path(metrics_json, m, members),
            metrics_csv=member_path(metrics_csv, m, members), stop_after=member_stop, log=log, meta=member_meta,
            eval_batch_size=eval_batch_size, amp=amp, device=device, **fit_kwargs)
        done.append(result)
        if (result.final.get("epoch") or 0) < epochs:
            break
    if len(done) < members or (done[-1].final.get("epoch") or 0) < epochs:
        return EnsembleResult(_ensemble_of(done), done, {}, time.perf_counter() - started)

    ensemble = _ensemble_of(done)
    final = {"members": members, "epoch": epochs}
    if test_data is not None:
        scores = train_module.evaluate(ensemble, test_data, eval_batch_size, device=train_module.resolve_device(device),
                                       amp=amp)
        final.update(test_loss=scores["loss"], test_acc=scores["accuracy"])
    if members > 1 and rank == 0:
        _write_summary(done, final, seed, meta or {}, metrics_json, metrics_csv)
    return EnsembleResult(ensemble, done, final, time.perf_counter() - started)


def _ensemble_of(results) -> nn.Module:
    models = [r.model for r in results]
    return models[0] if len(models) == 1 else Ensemble(models)


def _write_summary(results, final: dict, seed: int, meta: dict, json_path, csv_path) -> None:
    """The run's JSON/CSV files of an ensemble: every member's per-epoch rows, then the ensemble's result."""
    if json_path:
        write_json(json_path, {
            "meta": meta,
            "members": [{"member": m, "seed": member_seed(seed, m), "epochs": r.history, "final": r.final}
                        for m, r in enumerate(results)],
            "final": final})
    if csv_path:
        rows = [{"member": m, **row} for m, r in enumerate(results) for row in r.history]
        rows.append({"member": "ensemble", "epoch": final["epoch"], "test_loss": final.get("test_loss"),
                     "test_acc": final.get("test_acc")})
        write_csv(csv_path, ("member", *METRIC_COLUMNS), rows)
