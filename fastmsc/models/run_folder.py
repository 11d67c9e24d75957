"""Run folders: a trained :class:`Classifier` on disk, written by ``fastmsc train`` (or :func:`save`) and read by
:func:`load` and ``fastmsc predict``.

A run folder holds ``model.json`` (what to build: the format version, the members' MSCClassifier arguments, their
number, the class labels, the input normalisation, the parameters' dtype, and what the caller records of the
training) and ``model.pt`` (``{"format_version", "members": [state_dict, ...]}``, tensors only). ``fastmsc train``
adds its metrics (JSON, CSV) and a plot of the learning curves. Loading runs no code from the folder: the
description is JSON and the weights load with ``torch.load(weights_only=True)``, which refuses any pickled object
other than tensors and plain containers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .._files import replace_atomically, write_json
from .._version import __version__
from .classifier import NORMALISATIONS, Classifier
from .msc_classifier import MSCClassifier

RUN_FORMAT = 1  # raise when model.json or model.pt change meaning; load() refuses other versions
MODEL_FILE, WEIGHTS_FILE = "model.json", "model.pt"
_FORMAT_NAME = "fastmsc run"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RunFolderError(ValueError):
    """A run folder that cannot be loaded: the message names the file and what is wrong with it."""


class MissingRunFile(RunFolderError, FileNotFoundError):
    """The run folder, or a file it must hold, does not exist."""


def save(classifier: Classifier, run_dir, *, training: dict | None = None) -> Path:
    """Write ``classifier`` into ``run_dir`` (created if needed; its model files replaced); returns the folder.

    ``training``: JSON-serialisable facts about how it was trained (options, dataset, scores), kept in
    model.json for people to read; loading ignores them. model.json is written last, so a folder with it has
    complete weights.
    """
    if not isinstance(classifier, Classifier):
        raise TypeError(f"classifier must be a fastmsc.models.Classifier, got {type(classifier).__name__}")
    run_dir = Path(run_dir)
    dtype = next(classifier.parameters()).dtype
    weights = {"format_version": RUN_FORMAT,
               "members": [{k: v.detach().cpu() for k, v in member.state_dict().items()}
                           for member in classifier.members]}
    replace_atomically(run_dir / WEIGHTS_FILE, lambda tmp: torch.save(weights, tmp))
    write_json(run_dir / MODEL_FILE, {
        "format": _FORMAT_NAME, "format_version": RUN_FORMAT, "fastmsc_version": __version__,
        "model": "MSCClassifier", "config": classifier.config, "members": len(classifier.members),
        "classes": list(classifier.classes), "normalisation": classifier.normalisation,
        "dtype": str(dtype).removeprefix("torch."), "weights": WEIGHTS_FILE, "training": training or {}})
    return run_dir


def load(run_dir, device="cpu") -> Classifier:
    """The :class:`Classifier` saved in ``run_dir``, on ``device``, in eval mode.

    Raises :class:`MissingRunFile` for a missing folder or file and :class:`RunFolderError` for a folder of
    another format version, a malformed file, or weights that do not fit the described model; each names the file.
    Loading neither runs code from the folder nor changes torch's random state.
    """
    run_dir = Path(run_dir)
    description = read_description(run_dir)
    weights_path = run_dir / description["weights"]
    states = _read_weights(weights_path, description["members"])
    dtype = _DTYPES[description["dtype"]]
    members = []
    for m, state in enumerate(states):
        with torch.random.fork_rng(devices=[]):  # the initial weights drawn here are overwritten at once
            try:
                member = MSCClassifier(**description["config"]).to(dtype)
            except (TypeError, ValueError) as exc:
                raise RunFolderError(f"{run_dir / MODEL_FILE}: 'config' does not describe an MSCClassifier "
                                     f"({exc})") from None
        try:
            member.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise RunFolderError(f"{weights_path}: member {m}'s weights do not fit the model described in "
                                 f"{run_dir / MODEL_FILE} ({' '.join(line.strip() for line in first[:3])})") from None
        members.append(member)
    try:
        classifier = Classifier(members, description["classes"], description["normalisation"])
    except (TypeError, ValueError) as exc:
        raise RunFolderError(f"{run_dir / MODEL_FILE}: {exc}") from None
    return classifier.to(device).eval()


def read_description(run_dir) -> dict:
    """model.json of ``run_dir``, checked (format, version, keys and their types); see :func:`load`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingRunFile(f"run folder {run_dir} does not exist" if not run_dir.exists()
                             else f"{run_dir} is not a folder: give the run folder that holds {MODEL_FILE}")
    path = run_dir / MODEL_FILE
    if not path.is_file():
        hint = (" (training stopped before the end: a model is saved when it completes)"
                if (run_dir / "metrics.json").is_file() else "")
        raise MissingRunFile(f"{path} does not exist: {run_dir} is not a fastmsc run folder{hint}")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(description, dict) or description.get("format") != _FORMAT_NAME:
        raise RunFolderError(f"{path} does not describe a fastmsc model (no \"format\": \"{_FORMAT_NAME}\")")
    version = description.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunFolderError(f"{path}: format_version must be an integer, got {version!r}")
    if version != RUN_FORMAT:
        written = description.get("fastmsc_version", "an unknown version")
        advice = "upgrade fastmsc" if version > RUN_FORMAT else "train it again with this version"
        raise RunFolderError(f"{path} was written by fastmsc {written} in run format {version}; this fastmsc "
                             f"({__version__}) reads run format {RUN_FORMAT}: {advice}")
    kinds = {str: "a string", dict: "an object", int: "an integer", list: "a list"}
    expected = {"model": str, "config": dict, "members": int, "classes": list, "normalisation": str, "dtype": str,
                "weights": str}
    for key, kind in expected.items():
        value = description.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RunFolderError(f"{path}: {key!r} must be {kinds[kind]}, got {value!r}")
    checks = (("model", description["model"] == "MSCClassifier", "'MSCClassifier'"),
              ("members", description["members"] >= 1, "an integer >= 1"),
              ("classes", all(isinstance(c, str) for c in description["classes"]), "a list of label strings"),
              ("normalisation", description["normalisation"] in NORMALISATIONS, f"one of {NORMALISATIONS}"),
              ("dtype", description["dtype"] in _DTYPES, f"one of {tuple(_DTYPES)}"),
              ("weights", Path(description["weights"]).name == description["weights"]
               and description["weights"] not in ("", ".", ".."), "a file name in the folder"))
    for key, ok, wanted in checks:
        if not ok:
            raise RunFolderError(f"{path}: {key!r} must be {wanted}, got {description[key]!r}")
    return description


def _read_weights(path: Path, members: int) -> list[dict]:
    if not path.is_file():
        raise MissingRunFile(f"{path} does not exist: the run folder has no weights")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{path} was refused: it holds objects other than tensors, which could run code when "
                             f"loaded ({reason})") from None
    except Exception as exc:  # truncated, not a torch file: unreadable either way
        raise RunFolderError(f"{path} is not a readable weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(weights, dict) or weights.get("format_version") != RUN_FORMAT:
        raise RunFolderError(f"{path} is not a fastmsc weights file of run format {RUN_FORMAT}")
    states = weights.get("members")
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise RunFolderError(f"{path}: 'members' must be a list of state dicts")
    if len(states) != members:
        raise RunFolderError(f"{path} holds {len(states)} member(s) but {path.with_name(MODEL_FILE)} describes "
                             f"{members}")
    return states
