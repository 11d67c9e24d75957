"""DistributedDataParallel training on CPU (gloo): two ranks against one process on the same global batches."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmsc
from fastmsc import data, train
from fastmsc.models import MSCClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
PER_RANK_BATCH = 4
# 24 series = 3 global batches of WORLD * PER_RANK_BATCH: every rank's batch has the same size, so the mean of
# the per-rank mean gradients (what DDP's all-reduce gives) is the mean gradient of the global batch.
NUM_TRAIN = 24


def _dataset(seed):
    return data.synthetic(num_train=NUM_TRAIN, num_test=10, length=18, num_classes=3, channels=2,
                          variable_length=True, seed=seed)


def _model(train_set, seed):
    # conv_norm=False: plain BatchNorm under DDP normalises each rank's half batch with its own statistics, so
    # it is not the same function as BatchNorm over the global batch, and SyncBatchNorm (which would be) runs on
    # GPUs only. Without BatchNorm the DDP run must equal the single-process run exactly up to rounding, which
    # is what this test is for: sharding, gradient averaging, metric reduction.
    # float64 so that the reordered gradient sums round far below the tolerance.
    # dropout=0: each rank draws its own dropout masks (seed + rank), which one process cannot replay.
    torch.manual_seed(seed)
    return MSCClassifier(train_set.num_channels, train_set.num_classes, conv_channels=4, lstm_hidden=6,
                         classifier_hidden=8, dropout=0.0, conv_norm=False).double()


SETTINGS = {"epochs": 2, "lr": 1e-2, "warmup_epochs": 0.5, "weight_decay": 0.01, "label_smoothing": 0.05,
            "log": None, "progress": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, seed, out_dir):
    torch.set_num_threads(1)
    fastmsc.set_backend("torch")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        train_set, test_set = _dataset(seed)
        model = _model(train_set, seed)
        result = train.fit(model, train_set, test_set, batch_size=PER_RANK_BATCH, seed=seed, **SETTINGS)
        torch.save({"state": model.state_dict(), "history": result.history}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process_on_global_batches(tmp_path):
    fastmsc.set_backend("torch")
    seed = random.randrange(2**31)
    mp.spawn(_worker, args=(_free_port(), seed, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    train_set, test_set = _dataset(seed)
    initial = _model(train_set, seed).state_dict()
    single = train.fit(_model(train_set, seed), train_set, test_set, batch_size=WORLD * PER_RANK_BATCH, seed=seed,
                       **SETTINGS)
    for name, expected in single.model.state_dict().items():
        for r in range(1, WORLD):
            assert torch.equal(ranks[0]["state"][name], ranks[r]["state"][name]), f"seed {seed}: rank {r} {name}"
        got = ranks[0]["state"][name]
        # The key bias adds q·b_k to a whole softmax row, which softmax ignores: its gradient is zero.
        if name != "attention.key.bias":
            moved = float((expected - initial[name]).abs().max())
            assert moved > 1e-4, f"seed {seed}: {name} barely trained ({moved}); the comparison would prove nothing"
        where = f"seed {seed}, {name}"
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=lambda m, where=where: f"{where}: {m}")
    for ddp_row, row in zip(ranks[0]["history"], single.history, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert ddp_row[key] == pytest.approx(row[key], rel=1e-9, abs=1e-12), f"seed {seed}: epoch {row['epoch']}"


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    metrics = tmp_path / "m.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTMSC_BACKEND", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "fastmsc", "train", "--synthetic-train", "16", "--synthetic-test", "8", "--synthetic-length",
               "16", "--conv-channels", "4", "--lstm-hidden", "6", "--classifier-hidden", "8", "--batch-size", "4",
               "--epochs", "1", "--ensemble", "2", "--device", "cpu", "--backend", "torch", "--metrics-json",
               str(metrics), "--checkpoint", str(tmp_path / "c.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("test accuracy") == 1, f"only rank 0 reports:\n{done.stdout}"
    assert "(ensemble of 2)" in done.stdout, done.stdout
    summary = json.loads(metrics.read_text())
    assert summary["final"]["epoch"] == 1 and 0 <= summary["final"]["test_acc"] <= 1
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, f"rank 0 alone writes the run folder: {runs}"
    assert len(fastmsc.models.load(runs[0]).members) == 2
    saved = json.loads((tmp_path / "m.member1.json").read_text())
    assert saved["config"]["world_size"] == WORLD and saved["config"]["steps_per_epoch"] == 2
    state = train.load_checkpoint(tmp_path / "c.member1.pt")
    assert len(state["rng"]) == WORLD and not any(k.startswith("module.") for k in state["model"])
