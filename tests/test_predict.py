"""`fastmsc train` writes a run folder; `fastmsc predict` / `fastmsc evaluate` classify a file or dataset folder with
it (fastmsc.commands.predict); fastmsc.metrics.classification_report scores the predictions."""

from __future__ import annotations

import csv
import json
import random
import sys

import numpy as np
import pytest
import torch

import fastmsc
from fastmsc import cli, data
from fastmsc.metrics import classification_report, format_report
from fastmsc.models import load

TINY = ["--conv-channels", "4", "--lstm-hidden", "6", "--classifier-hidden", "8", "--batch-size", "8",
        "--backend", "torch", "--device", "cpu", "--quiet"]
CLASSES = ("down", "up", "wave")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Commands run in a fresh folder (the default run folder is runs/ under the working directory)."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()  # `fastmsc train` sets its --threads default (1); put the suite's back
    yield
    torch.set_num_threads(threads)


def _series_line(rng, label, length, channels, labelled=True):
    t = np.linspace(0, 1, length)
    shape = {"down": -t, "up": t, "wave": np.sin(6 * t)}[label]
    values = [",".join(f"{v:.5f}" for v in shape + 0.3 * rng.standard_normal(length) + c) for c in range(channels)]
    return ":".join(values) + (f":{label}" if labelled else "")


def _write_ts(path, rng, count, channels=2, labelled=True, classes=CLASSES):
    """A .ts file of ``count`` series of lengths 9..21 (unequal), labels drawn from ``classes``."""
    header = [f"@problemName {path.stem.rsplit('_', 1)[0]}", "@timeStamps false", "@missing false",
              f"@univariate {'true' if channels == 1 else 'false'}", "@equalLength false"]
    header += [f"@dimensions {channels}"] if channels > 1 else []
    header += [f"@classLabel true {' '.join(classes)}" if labelled else "@classLabel false", "@data"]
    labels = [classes[i % len(classes)] for i in range(count)]
    lines = [_series_line(rng, label if label in CLASSES else "up", int(rng.integers(9, 22)), channels, labelled)
             for label in labels]
    if labelled:
        lines = [line.rsplit(":", 1)[0] + ":" + label for line, label in zip(lines, labels, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines) + "\n")
    return labels


def _dataset(tmp_path, seed, channels=2):
    rng = np.random.default_rng(seed)
    folder = tmp_path / "Toy"
    _write_ts(folder / "Toy_TRAIN.ts", rng, 18, channels)
    test_labels = _write_ts(folder / "Toy_TEST.ts", rng, 13, channels)
    return folder, test_labels


def _run(argv, capsys):
    """``fastmsc ARGV`` in this process: (exit status, stdout lines, stderr lines)."""
    capsys.readouterr()
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def _train(folder, capsys, *options):
    status, out, err = _run(["train", "--data", str(folder), "--epochs", "1", *TINY, *options], capsys)
    assert status == 0, err
    saved = [line for line in out if line.startswith("saved the model in ")]
    assert len(saved) == 1, out
    return saved[0].removeprefix("saved the model in ").split(";")[0], out


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_predict_evaluate_end_to_end(tmp_path, capsys):
    seed = random.randrange(2**31)
    folder, test_labels = _dataset(tmp_path, seed)
    run_dir, _ = _train(folder, capsys, "--ensemble", "2", "--seed", str(seed % 1000), "--znorm")
    assert run_dir.startswith("runs/Toy-")
    files = sorted(p.name for p in (tmp_path / run_dir).iterdir())
    expected = {"model.json", "model.pt", "metrics.json", "metrics.csv", "metrics.member0.json",
                "metrics.member1.json", "metrics.member0.csv", "metrics.member1.csv"}
    assert expected <= set(files), files
    matplotlib_present = "matplotlib" in sys.modules or _importable("matplotlib")
    assert ("learning_curves.png" in files) == matplotlib_present
    if matplotlib_present:
        assert (tmp_path / run_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    description = json.loads((tmp_path / run_dir / "model.json").read_text())
    assert description["classes"] == list(CLASSES) and description["members"] == 2
    assert description["normalisation"] == "znorm" and description["training"]["options"]["epochs"] == 1
    summary = json.loads((tmp_path / run_dir / "metrics.json").read_text())

    status, out, err = _run(["predict", run_dir, "--data", str(folder), "--out", "p.csv"], capsys)
    assert status == 0 and not err, err
    rows = _read_csv(tmp_path / "p.csv")
    assert len(rows) == 13 and list(rows[0]) == ["index", "label", "predicted", "p_down", "p_up", "p_wave"]
    assert [row["label"] for row in rows] == test_labels
    assert [int(row["index"]) for row in rows] == list(range(13))
    probabilities = torch.tensor([[float(row[f"p_{c}"]) for c in CLASSES] for row in rows], dtype=torch.float64)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(13, dtype=torch.float64), rtol=0, atol=1e-6)
    # The CSV holds what the Python API gives for the same file
    test = data.load_inputs(folder / "Toy_TEST.ts")
    classifier = load(tmp_path / run_dir)
    assert [row["predicted"] for row in rows] == classifier.predict(test).tolist()
    torch.testing.assert_close(probabilities, classifier.predict_proba(test).double(), rtol=0, atol=0)
    correct = sum(row["predicted"] == row["label"] for row in rows)
    assert f"accuracy {correct / 13:.4f} ({correct}/13 series)" in out
    assert correct / 13 == pytest.approx(summary["final"]["test_acc"]), "predict scores what training scored"
    assert "confusion matrix (rows: true class, columns: predicted class)" in out
    matrix = [line.split() for line in out[out.index("confusion matrix (rows: true class, columns: predicted "
                                                             "class)") + 2:]]
    assert [row[0] for row in matrix] == list(CLASSES)
    assert sum(int(row[1 + k]) for k, row in enumerate(matrix)) == correct

    status, out, err = _run(["evaluate", run_dir, "--data", str(folder), "--split", "train", "--out", "t.csv"],
                            capsys)
    assert status == 0 and len(_read_csv(tmp_path / "t.csv")) == 18, err
    assert out[0].startswith(f"{folder / 'Toy_TRAIN.ts'}: 18 series, 2 channel(s), lengths ")


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_unlabelled_series_are_predicted_and_evaluate_refuses_them(tmp_path, capsys):
    folder, _ = _dataset(tmp_path, random.randrange(2**31))
    run_dir, _ = _train(folder, capsys, "--ensemble", "1")
    unlabelled = tmp_path / "new.ts"
    _write_ts(unlabelled, np.random.default_rng(0), 5, labelled=False)
    status, out, err = _run(["predict", run_dir, "--data", str(unlabelled)], capsys)
    assert status == 0 and not err, err
    rows = _read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 5 and "label" not in rows[0] and {row["predicted"] for row in rows} <= set(CLASSES)
    assert not any(line.startswith("accuracy") for line in out), out
    status, _, err = _run(["evaluate", run_dir, "--data", str(unlabelled)], capsys)
    assert status == 2 and err == [f"fastmsc evaluate: error: {unlabelled} holds no labels (@classLabel false): "
                                   "evaluate needs labelled series; `fastmsc predict` classifies them"]


def test_labels_the_model_never_saw_count_as_errors(tmp_path, capsys):
    folder, _ = _dataset(tmp_path, random.randrange(2**31))
    run_dir, _ = _train(folder, capsys, "--ensemble", "1")
    other = tmp_path / "other.ts"
    _write_ts(other, np.random.default_rng(1), 6, classes=("up", "spike"))
    status, out, err = _run(["predict", run_dir, "--data", str(other)], capsys)
    assert status == 0, err
    assert "note: 3 series carry labels the model was not trained on (spike); they count as misclassified" in out
    spike = next(line for line in out if line.startswith("spike "))
    assert spike.split()[1:3] == ["n/a", "0.0000"], spike


def test_predict_errors_are_one_line(tmp_path, capsys):
    folder, _ = _dataset(tmp_path, random.randrange(2**31))
    run_dir, _ = _train(folder, capsys, "--ensemble", "1")
    one_channel = tmp_path / "one.ts"
    _write_ts(one_channel, np.random.default_rng(2), 4, channels=1)
    cases = [
        (["predict", "nowhere", "--data", str(folder)], "run folder nowhere does not exist"),
        (["predict", run_dir, "--data", str(tmp_path / "absent.ts")], f"data file {tmp_path / 'absent.ts'} does not "
                                                                        "exist"),
        (["predict", run_dir, "--data", str(one_channel)], f"{one_channel} holds series of 1 channel(s) but the model "
                                                           f"in {run_dir} takes 2"),
        (["predict", run_dir, "--data", str(one_channel), "--split", "train"],
         f"--split chooses a file in a dataset folder, but --data {one_channel} is a file"),
        (["predict", run_dir, "--data", str(folder), "--out", str(tmp_path)], f"--out {tmp_path} is a folder; give a "
                                                                               "file path"),
        (["predict", run_dir, "--data", str(folder), "--batch-size", "0"], "--batch-size must be an integer >= 1, "
                                                                           "got 0"),
    ]
    for argv, message in cases:
        status, _, err = _run(argv, capsys)
        assert (status, err) == (2, [f"fastmsc predict: error: {message}"]), argv
    (tmp_path / run_dir / "model.json").write_text("[]")
    status, _, err = _run(["predict", run_dir, "--data", str(folder)], capsys)
    assert status == 2 and err == [f"fastmsc predict: error: {run_dir}/model.json does not describe a fastmsc model "
                                   '(no "format": "fastmsc run")']


def test_train_out_folder_rules(tmp_path, capsys, monkeypatch):
    folder, _ = _dataset(tmp_path, random.randrange(2**31))
    run_dir, out = _train(folder, capsys, "--ensemble", "1", "--out", "mine")
    assert run_dir == "mine" and out[-1] == "saved the model in mine; classify new series with: fastmsc predict mine " \
                                            "--data PATH"
    status, _, err = _run(["train", "--data", str(folder), *TINY, "--out", "mine"], capsys)
    assert (status, err) == (2, ["fastmsc train: error: --out mine already holds a trained model (model.json); "
                                 "choose another folder"])
    (tmp_path / "afile").write_text("")
    status, _, err = _run(["train", "--data", str(folder), *TINY, "--out", "afile"], capsys)
    assert (status, err) == (2, ["fastmsc train: error: --out afile is a file; give a folder"])
    # Without matplotlib: one line, and everything else is saved
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run_dir, out = _train(folder, capsys, "--ensemble", "1", "--out", "plain")
    assert "matplotlib is not installed: no learning_curves.png (pip install matplotlib)" in out
    assert not (tmp_path / "plain" / "learning_curves.png").exists() and (tmp_path / "plain" / "model.pt").exists()


def test_a_run_stopped_early_saves_no_model(tmp_path, capsys):
    folder, _ = _dataset(tmp_path, random.randrange(2**31))
    status, out, err = _run(["train", "--data", str(folder), "--epochs", "2", *TINY, "--ensemble", "1",
                             "--stop-after", "1", "--checkpoint", "c.pt", "--out", "early"], capsys)
    assert status == 0, err
    assert out[-1] == "metrics in early; no model saved: training stopped before the end (continue it with --resume " \
                      "c.pt --out early)"
    assert (tmp_path / "early" / "metrics.json").exists() and not (tmp_path / "early" / "model.json").exists()
    status, out, err = _run(["train", "--data", str(folder), "--epochs", "2", *TINY, "--ensemble", "1",
                             "--checkpoint", "c.pt", "--resume", "c.pt", "--out", "early"], capsys)
    assert status == 0 and out[-1].startswith("saved the model in early;"), err
    assert load(tmp_path / "early").classes == CLASSES


def test_gunpoint_train_then_predict(shared_data, capsys):
    """The quickstart: train on the shared GunPoint data, then classify its 150 test series."""
    fastmsc.set_backend("torch")
    run_dir, _ = _train(shared_data / "GunPoint", capsys, "--ensemble", "1")
    status, out, err = _run(["predict", run_dir, "--data", str(shared_data / "GunPoint")], capsys)
    assert status == 0, err
    assert len(_read_csv("predictions.csv")) == 150
    assert any(line.startswith("accuracy ") and line.endswith("/150 series)") for line in out), out


def test_classification_report_against_counts():
    rng = random.Random()
    classes = ["a", "b", "c"]
    labels = [rng.choice(classes + ["x"]) for _ in range(200)]
    predicted = [rng.choice(classes) for _ in range(200)]
    report = classification_report(labels, predicted, classes)
    assert report["classes"] == classes + ["x"] and report["count"] == 200
    assert report["accuracy"] == sum(a == b for a, b in zip(labels, predicted, strict=True)) / 200
    for k, name in enumerate(report["classes"]):
        tp = sum(a == b == name for a, b in zip(labels, predicted, strict=True))
        row = report["per_class"][k]
        assert row["support"] == labels.count(name) == sum(report["confusion"][k])
        assert row["recall"] == (tp / labels.count(name) if labels.count(name) else None)
        assert row["precision"] == (tp / predicted.count(name) if predicted.count(name) else None)
        for j, other in enumerate(report["classes"]):
            assert report["confusion"][k][j] == sum(a == name and b == other
                                                    for a, b in zip(labels, predicted, strict=True))
    text = format_report(report)
    correct = sum(a == b for a, b in zip(labels, predicted, strict=True))
    assert text.splitlines()[0] == f"accuracy {correct / 200:.4f} ({correct}/200 series)"
    assert classification_report([], [], classes)["accuracy"] is None
    with pytest.raises(ValueError, match="one entry per series, got 2 and 1"):
        classification_report(["a", "b"], ["a"], classes)
    with pytest.raises(ValueError, match=r"predicted labels \['q'\] are not among the classes"):
        classification_report(["a"], ["q"], classes)
