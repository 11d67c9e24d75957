"""fastmsc.ensemble: the averaged-probability Ensemble module, fit_ensemble (seeds, files, resume) and
`fastmsc train --ensemble`."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys

import pytest
import torch
from test_train import TINY_CLI, _cli_env, _parse_cli

import fastmsc
from fastmsc import data, train
from fastmsc.commands import train as train_command
from fastmsc.ensemble import Ensemble, fit_ensemble, member_path, member_seed
from fastmsc.models import MSCClassifier

TINY_MODEL = {"conv_channels": 4, "lstm_hidden": 6, "classifier_hidden": 8, "dropout": 0.2}


@pytest.fixture(autouse=True)
def _torch_backend():
    fastmsc.set_backend("torch")
    yield


def _tiny(seed):
    return data.synthetic(num_train=20, num_test=10, length=18, num_classes=3, channels=2, variable_length=True,
                          seed=seed)


def _maker(train_set):
    return lambda: MSCClassifier(train_set.num_channels, train_set.num_classes, **TINY_MODEL)


def _same_parameters(a, b, context):
    state_b = b.state_dict()
    assert a.state_dict().keys() == state_b.keys()
    for name, p in a.state_dict().items():
        assert torch.equal(p, state_b[name]), f"{context}: {name} differs"


def test_ensemble_averages_member_probabilities():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    members = [MSCClassifier(2, 4, **TINY_MODEL).double().eval() for _ in range(3)]
    x = torch.randn(5, 2, 13, dtype=torch.float64)
    lengths = torch.tensor([13, 1, 7, 12, 13])
    out = Ensemble(members)(x, lengths)
    expected = torch.stack([torch.softmax(m(x, lengths), -1) for m in members]).mean(0)
    torch.testing.assert_close(out.exp(), expected, rtol=1e-12, atol=1e-14, msg=f"seed {seed}")
    assert out.shape == (5, 4) and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


def test_member_seeds_and_paths(tmp_path):
    assert [member_seed(7, m) for m in range(3)] == [7, 1007, 2007]
    assert member_path(tmp_path / "run.pt", 0, 1) == tmp_path / "run.pt"
    assert member_path(tmp_path / "run.pt", 2, 3) == tmp_path / "run.member2.pt"
    assert member_path(None, 0, 3) is None


def test_single_member_is_exactly_fit():
    seed = random.randrange(2**31)
    train_set, test_set = _tiny(seed)
    settings = {"epochs": 2, "batch_size": 6, "log": None}
    torch.manual_seed(seed)
    alone = train.fit(_maker(train_set)(), train_set, test_set, seed=seed, **settings)
    result = fit_ensemble(_maker(train_set), train_set, test_set, members=1, seed=seed, **settings)
    _same_parameters(alone.model, result.model, f"seed {seed}")
    assert result.final["test_acc"] == alone.final["test_acc"]


def test_members_are_trained_independently():
    """Member m equals a single model trained with seed + 1000 m; the ensemble's accuracy is its own score."""
    seed = random.randrange(2**31)
    train_set, test_set = _tiny(seed)
    settings = {"epochs": 2, "batch_size": 6, "log": None}
    result = fit_ensemble(_maker(train_set), train_set, test_set, members=2, seed=seed, **settings)
    assert isinstance(result.model, Ensemble) and len(result.members) == 2
    torch.manual_seed(seed + 1000)
    second = train.fit(_maker(train_set)(), train_set, test_set, seed=seed + 1000, **settings)
    _same_parameters(result.model.members[1], second.model, f"seed {seed}")
    scores = train.evaluate(result.model, test_set)
    assert result.final == {"members": 2, "epoch": 2, "test_loss": scores["loss"], "test_acc": scores["accuracy"]}


@pytest.mark.parametrize("stop_at", [1, 3])  # inside member 0, inside member 1
def test_resume_equals_uninterrupted_run(tmp_path, stop_at):
    seed = random.randrange(2**31)
    train_set, test_set = _tiny(seed)
    settings = {"members": 2, "epochs": 2, "batch_size": 6, "seed": seed, "log": None}
    straight = fit_ensemble(_maker(train_set), train_set, test_set, **settings)

    checkpoint = tmp_path / "run.pt"
    first = fit_ensemble(_maker(train_set), train_set, test_set, checkpoint=checkpoint, stop_after=stop_at,
                         **settings)
    assert not first.complete and first.final == {}
    assert sum(r.epochs_done for r in first.members) == stop_at
    torch.manual_seed(seed + 99)  # resume restores the RNG: disturbing it must not matter
    resumed = fit_ensemble(_maker(train_set), train_set, test_set, checkpoint=checkpoint, resume=checkpoint,
                           **settings)
    assert resumed.complete
    _same_parameters(straight.model, resumed.model, f"seed {seed}, stop at {stop_at}")
    assert resumed.final == straight.final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.member0.pt", "run.member1.pt"]


def test_rejects_bad_arguments():
    train_set, test_set = _tiny(0)
    with pytest.raises(ValueError, match="members must be an int >= 1, got 0"):
        fit_ensemble(_maker(train_set), train_set, members=0, log=None)
    with pytest.raises(ValueError, match=r"stop_after must be in \[1, members \* epochs = 4\], got 5"):
        fit_ensemble(_maker(train_set), train_set, members=2, epochs=2, stop_after=5, log=None)


def test_summary_files(tmp_path):
    seed = random.randrange(2**31)
    train_set, test_set = _tiny(seed)
    json_path, csv_path = tmp_path / "m.json", tmp_path / "m.csv"
    result = fit_ensemble(_maker(train_set), train_set, test_set, members=2, epochs=2, batch_size=6, seed=seed,
                          metrics_json=json_path, metrics_csv=csv_path, meta={"dataset": "tiny"}, log=None)
    summary = json.loads(json_path.read_text())
    assert summary["final"] == result.final and summary["meta"] == {"dataset": "tiny"}
    assert [m["seed"] for m in summary["members"]] == [seed, seed + 1000]
    assert [m["epochs"] for m in summary["members"]] == [r.history for r in result.members]
    member_file = json.loads((tmp_path / "m.member1.json").read_text())
    assert member_file["epochs"] == result.members[1].history and member_file["meta"]["member"] == 1
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["member"] for r in rows] == ["0", "0", "1", "1", "ensemble"]
    assert float(rows[-1]["test_acc"]) == result.final["test_acc"]
    assert float(rows[1]["train_loss"]) == result.members[0].history[1]["train_loss"]


def test_cli_ensemble_stops_and_resumes(tmp_path):
    metrics, checkpoint = tmp_path / "m.json", tmp_path / "c.pt"
    base = [sys.executable, "-m", "fastmsc", "train", *TINY_CLI, "--epochs", "1", "--ensemble", "2", "--seed", "5",
            "--metrics-json", str(metrics), "--checkpoint", str(checkpoint)]
    done = subprocess.run(base + ["--stop-after", "1"], capture_output=True, text=True, timeout=300, env=_cli_env(),
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an ensemble of 2 models" in done.stdout and "member 1/2 (seed 5)" in done.stdout, done.stdout
    assert "member 2/2" not in done.stdout and "(member 1/2) after epoch 1/1" in done.stdout, done.stdout
    assert not metrics.exists() and (tmp_path / "m.member0.json").exists()
    done = subprocess.run(base + ["--resume", str(checkpoint), "--quiet"], capture_output=True, text=True,
                          timeout=300, env=_cli_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("synthetic: member test accuracies"), lines
    assert lines[2].startswith("saved the model in runs/synthetic-"), lines
    assert "(ensemble of 2) after epoch 1/1" in lines[1], lines
    assert json.loads(metrics.read_text())["final"]["members"] == 2
    with pytest.raises(ValueError, match="--ensemble must be an integer >= 1, got 0"):
        train_command.run(_parse_cli([*TINY_CLI, "--ensemble", "0"]))
