"""fastmsc.models: Classifier (predict, predict_proba), save and load of run folders: round trips bit for bit on
the CPU, ensembles, variable lengths, normalisation, and every error a damaged, foreign or hostile folder raises."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastmsc
from fastmsc import data
from fastmsc.ensemble import fit_ensemble
from fastmsc.models import Classifier, MissingRunFile, MSCClassifier, RunFolderError, load, save

TINY_MODEL = {"conv_channels": 4, "lstm_hidden": 6, "classifier_hidden": 8, "dropout": 0.2}


@pytest.fixture(autouse=True)
def _torch_backend():
    fastmsc.set_backend("torch")
    yield


def _tiny(seed):
    return data.synthetic(num_train=20, num_test=11, length=19, num_classes=3, channels=2, variable_length=True,
                          seed=seed)


def _members(count, seed, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return [MSCClassifier(2, 3, **{**TINY_MODEL, **overrides}).to(dtype) for _ in range(count)]


def _saved(tmp_path, members=2, seed=0, normalisation="none"):
    classifier = Classifier(_members(members, seed), ("down", "flat", "up"), normalisation)
    return classifier, save(classifier, tmp_path / "run")


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("normalisation", ["none", "znorm"])
def test_trained_ensemble_round_trips_bit_for_bit(tmp_path, members, normalisation):
    seed = random.randrange(2**31)
    train_set, test_set = _tiny(seed)
    result = fit_ensemble(lambda: MSCClassifier(2, 3, **TINY_MODEL), train_set, test_set, members=members, epochs=1,
                          batch_size=8, seed=seed, log=None, progress=False)
    trained = Classifier([r.model for r in result.members], train_set.classes, normalisation)
    before = trained.predict_proba(test_set)
    rng_before = torch.get_rng_state()
    loaded = load(save(trained, tmp_path / "run"))
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not draw from torch's random stream"
    assert not loaded.training and loaded.classes == train_set.classes and len(loaded.members) == members
    assert loaded.normalisation == normalisation and loaded.config == trained.config
    for original, copy in zip(trained.members, loaded.members, strict=True):
        expected = original.state_dict()
        assert expected.keys() == copy.state_dict().keys()
        assert all(torch.equal(expected[k], v) for k, v in copy.state_dict().items())
    after = loaded.predict_proba(test_set)
    assert torch.equal(before, after), f"seed {seed}: predictions changed through save/load"
    assert np.array_equal(trained.predict(test_set), loaded.predict(test_set))
    if normalisation == "none" and members > 1:
        # The ensemble fit_ensemble scored is the classifier's model: same probabilities on the test split
        result.model.eval()
        with torch.no_grad():
            expected = result.model(test_set.x, test_set.lengths).exp()
        torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_probabilities_are_the_mean_of_the_members_softmax_on_normalised_series():
    seed = random.randrange(2**31)
    members = _members(3, seed, torch.float64)
    classifier = Classifier(members, ("a", "b", "c"), "znorm")
    generator = torch.Generator().manual_seed(seed)
    x = 3 + 5 * torch.randn(7, 2, 23, dtype=torch.float64, generator=generator)
    lengths = torch.randint(1, 24, (7,), generator=generator)
    lengths[0] = 23
    valid = torch.arange(23)[None, None, :] < lengths[:, None, None]
    # Normalisation written out independently: per series and channel, over the valid steps (population std).
    expected_x = torch.zeros_like(x)
    for b in range(7):
        part = x[b, :, : lengths[b]]
        std = part.std(dim=1, unbiased=False, keepdim=True)
        expected_x[b, :, : lengths[b]] = torch.where(std < 1e-8, 0, (part - part.mean(1, keepdim=True)) / std)
    # The padding of the raw series must not matter
    x = torch.where(valid, x, torch.full_like(x, 1e6))
    for m in members:
        m.eval()
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(expected_x, lengths), dim=1) for m in members]).mean(0)
    got = classifier.predict_proba(x, lengths)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    labels = classifier.predict(x, lengths)
    assert labels.tolist() == [("a", "b", "c")[k] for k in expected.argmax(1).tolist()]


def test_predict_proba_inputs_batches_and_modes():
    seed = random.randrange(2**31)
    _, test_set = _tiny(seed)
    classifier = Classifier(_members(2, seed), test_set.classes)
    classifier.train()
    whole = classifier.predict_proba(test_set.x, test_set.lengths)
    assert classifier.training, "predict_proba puts the mode back"
    assert whole.shape == (11, 3) and whole.device.type == "cpu"
    torch.testing.assert_close(whole.sum(1), torch.ones(11), rtol=0, atol=1e-6)
    # A series' result does not depend on its batch (float32: only the matmul blocking may differ)
    torch.testing.assert_close(classifier.predict_proba(test_set, batch_size=4), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(classifier.predict_proba(test_set.x.numpy(), test_set.lengths.numpy()), whole,
                               rtol=0, atol=0)
    # Non-contiguous input
    wide = torch.zeros(11, 2, 2 * test_set.x.shape[2])
    wide[..., ::2] = test_set.x
    torch.testing.assert_close(classifier.predict_proba(wide[..., ::2], test_set.lengths), whole, rtol=0, atol=0)
    empty = classifier.predict_proba(torch.zeros(0, 2, 5))
    assert empty.shape == (0, 3) and classifier.predict(torch.zeros(0, 2, 5)).shape == (0,)
    with torch.enable_grad():
        assert not classifier.predict_proba(test_set).requires_grad


def test_classifier_rejects_bad_arguments():
    members = _members(2, 0)
    with pytest.raises(ValueError, match="at least one"):
        Classifier([], ("a", "b", "c"))
    with pytest.raises(TypeError, match=r"members\[1\] must be a fastmsc.models.MSCClassifier, got Linear"):
        Classifier([members[0], torch.nn.Linear(2, 3)], ("a", "b", "c"))
    other = MSCClassifier(2, 3, **{**TINY_MODEL, "lstm_hidden": 4})
    with pytest.raises(ValueError, match=r"members\[1\] differs from members\[0\] in lstm_hidden"):
        Classifier([members[0], other], ("a", "b", "c"))
    with pytest.raises(ValueError, match="name the model's 3 outputs, got 2"):
        Classifier(members, ("a", "b"))
    with pytest.raises(ValueError, match="distinct strings"):
        Classifier(members, ("a", "a", "b"))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        Classifier(members, ("a", "b", "c"), "minmax")
    classifier = Classifier(members, ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, T\), got \(4, 3, 9\)"):
        classifier.predict(torch.zeros(4, 3, 9))
    with pytest.raises(ValueError, match="lengths"):
        classifier.predict(torch.zeros(4, 2, 9), torch.tensor([1, 2, 3, 10]))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        classifier.predict(torch.zeros(4, 2, 9), batch_size=0)
    with pytest.raises(TypeError, match="must be a fastmsc.models.Classifier"):
        save(members[0], "unused")


def test_fastmsc_models_is_an_attribute_after_import_fastmsc():
    done = subprocess.run([sys.executable, "-c", "import fastmsc; print(fastmsc.models.load.__module__, "
                           "fastmsc.models.MSCClassifier.__name__)"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["fastmsc.models.run_folder", "MSCClassifier"]


def _edit_description(run_dir, **changes):
    path = run_dir / "model.json"
    description = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            description.pop(key)
        else:
            description[key] = value
    path.write_text(json.dumps(description))
    return path


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(MissingRunFile, match=f"run folder {tmp_path / 'absent'} does not exist"):
        load(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingRunFile, match="is not a folder"):
        load(tmp_path / "file")
    (tmp_path / "stopped").mkdir()
    with pytest.raises(MissingRunFile, match=r"stopped/model.json does not exist: .* is not a fastmsc run folder$"):
        load(tmp_path / "stopped")
    (tmp_path / "stopped" / "metrics.json").write_text("{}")
    with pytest.raises(MissingRunFile, match="training stopped before the end"):
        load(tmp_path / "stopped")
    _, run_dir = _saved(tmp_path)
    (run_dir / "model.pt").unlink()
    with pytest.raises(MissingRunFile, match=r"run/model.pt does not exist"):
        load(run_dir)
    assert issubclass(MissingRunFile, FileNotFoundError) and issubclass(RunFolderError, ValueError)


@pytest.mark.parametrize("changes, message", [
    ({"format": None}, r"model.json does not describe a fastmsc model"),
    ({"format_version": 0}, r"written by fastmsc 0.1.0 in run format 0; this fastmsc \(.*\) reads run format 1: "
                            r"train it again"),
    ({"format_version": 2, "fastmsc_version": "9.0"}, r"written by fastmsc 9.0 in run format 2; .*upgrade fastmsc"),
    ({"format_version": "1"}, r"format_version must be an integer, got '1'"),
    ({"classes": None}, r"'classes' must be a list, got None"),
    ({"members": True}, r"'members' must be an integer, got True"),
    ({"members": 0}, r"'members' must be an integer >= 1, got 0"),
    ({"normalisation": "minmax"}, r"'normalisation' must be one of"),
    ({"dtype": "int8"}, r"'dtype' must be one of"),
    ({"model": "ResNet"}, r"'model' must be 'MSCClassifier'"),
    ({"weights": "../elsewhere.pt"}, r"'weights' must be a file name in the folder"),
    ({"weights": ".."}, r"'weights' must be a file name in the folder, got '\.\.'"),
    ({"classes": ["a", "b"]}, r"classes must name the model's 3 outputs, got 2"),
    ({"config": {"in_channels": 2}}, r"'config' does not describe an MSCClassifier"),
    ({"members": 3}, r"model.pt holds 2 member\(s\) but .*model.json describes 3"),
])
def test_malformed_description_is_refused_naming_the_file(tmp_path, changes, message):
    _, run_dir = _saved(tmp_path)
    _edit_description(run_dir, **changes)
    with pytest.raises(RunFolderError, match=message) as caught:
        load(run_dir)
    assert str(run_dir) in str(caught.value)


def test_configuration_that_does_not_fit_the_weights_is_refused(tmp_path):
    classifier, run_dir = _saved(tmp_path)
    _edit_description(run_dir, config={**classifier.config, "lstm_hidden": 7})
    with pytest.raises(RunFolderError, match=r"model.pt: member 0's weights do not fit the model described in "
                                             r".*model.json \(.*size mismatch"):
        load(run_dir)


def test_unreadable_description_and_weights(tmp_path):
    _, run_dir = _saved(tmp_path)
    weights = (run_dir / "model.pt").read_bytes()
    (run_dir / "model.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(RunFolderError, match="model.pt is not a readable weights file"):
        load(run_dir)
    torch.save({"something": torch.zeros(2)}, run_dir / "model.pt")
    with pytest.raises(RunFolderError, match="model.pt is not a fastmsc weights file of run format 1"):
        load(run_dir)
    (run_dir / "model.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="model.json is not valid JSON"):
        load(run_dir)


class _Payload:
    """Pickles as a call of open(path, 'w'): unpickling it without weights_only creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    _, run_dir = _saved(tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(run_dir / "model.pt", weights_only=True)
    state["members"][0]["extra"] = _Payload(marker)
    torch.save(state, run_dir / "model.pt")
    with pytest.raises(RunFolderError, match="model.pt was refused: it holds objects other than tensors"):
        load(run_dir)
    assert not marker.exists(), "loading must not execute code from the run folder"
    # The payload is live: a plain unpickling runs it (so the check above can fail)
    torch.load(run_dir / "model.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("normalisation", ["none", "znorm"])
def test_padding_never_matters_and_non_finite_series_are_refused(normalisation):
    seed = random.randrange(2**31)
    _, test_set = _tiny(seed)
    assert test_set.lengths is not None and bool((test_set.lengths < test_set.x.shape[2]).any())
    classifier = Classifier(_members(2, seed), test_set.classes, normalisation)
    expected = classifier.predict_proba(test_set)
    valid = torch.arange(test_set.x.shape[2])[None, None, :] < test_set.lengths[:, None, None]
    for fill in (float("nan"), float("inf"), 1e30):
        padded = torch.where(valid, test_set.x, fill)
        torch.testing.assert_close(classifier.predict_proba(padded, test_set.lengths), expected, rtol=0, atol=0,
                                   msg=f"padding filled with {fill} changed the result")
    broken = test_set.x.clone()
    broken[3, 1, 0] = float("nan")
    broken[7, 0, int(test_set.lengths[7]) - 1] = float("-inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values within the valid steps of 2 series \(3, 7\)"):
        classifier.predict(broken, test_set.lengths)
