"""``fastmsc predict RUN_DIR --data PATH``: classify every series of a ``.ts``/``.tsv`` file or dataset folder with
the model of a run folder (:func:`fastmsc.models.load`), write one CSV row per series and, when the series carry
labels, print the accuracy, per-class precision and recall and the confusion matrix. ``fastmsc evaluate`` is the
same with labels required (:mod:`fastmsc.commands.evaluate`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .._distributed import resolve_device
from .._files import write_csv
from ..backend import BACKENDS, set_backend
from ..data import load_inputs, split_files
from ..metrics import classification_report, format_report
from ..models import RunFolderError, load
from ._usage import UsageError, check_writable

COMMAND = "predict"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fastmsc train`")
    parser.add_argument("--data", metavar="PATH", required=True,
                        help="a .ts/.tsv file, or a folder holding NAME_TRAIN and NAME_TEST (see --split)")
    parser.add_argument("--split", choices=("test", "train"),
                        help="with a folder as --data: which split to classify (default: test)")
    parser.add_argument("--name", help="with a folder as --data: which dataset of the folder (default: the "
                                       "folder's name)")
    parser.add_argument("--out", metavar="CSV", default="predictions.csv",
                        help="where to write the predictions (default: predictions.csv)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="fastmsc op backend")
    parser.add_argument("--batch-size", type=int, default=256, help="series per forward pass")


def main(args, require_labels: bool = False) -> int:
    """:func:`run`, with a mistake in the command or what it names printed as one line, exit status 2."""
    command = "evaluate" if require_labels else COMMAND
    try:
        return run(args, require_labels)
    except UsageError as exc:
        print(f"fastmsc {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the CSV could not be written (disk full, a folder removed)
        print(f"fastmsc {command}: error: {exc}", file=sys.stderr)
        return 1


def run(args, require_labels: bool = False) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    out = Path(args.out)
    check_writable("--out", out)
    set_backend(args.backend)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:  # CUDA asked for but absent; a name torch cannot parse
        raise UsageError(f"--device {args.device!r}: {exc}") from None
    try:
        classifier = load(args.run_dir, device=device)
    except RunFolderError as exc:
        raise UsageError(str(exc)) from None
    inputs = _read_inputs(args)
    if require_labels and inputs.labels is None:
        raise UsageError(f"{inputs.path} holds no labels (@classLabel false): evaluate needs labelled series; "
                         f"`fastmsc predict` classifies them")
    if inputs.x.shape[1] != classifier.in_channels:
        raise UsageError(f"{inputs.path} holds series of {inputs.x.shape[1]} channel(s) but the model in "
                         f"{args.run_dir} takes {classifier.in_channels}")

    probabilities = classifier.predict_proba(inputs.x, inputs.lengths, batch_size=args.batch_size)
    predicted = [classifier.classes[k] for k in probabilities.argmax(dim=1).tolist()]
    _write_predictions(out, classifier.classes, inputs.labels, predicted, probabilities)
    lengths = inputs.lengths if inputs.lengths is not None else torch.full((len(predicted),), inputs.x.shape[2])
    print(f"{inputs.path}: {len(predicted)} series, {inputs.x.shape[1]} channel(s), lengths "
          f"{int(lengths.min())}-{int(lengths.max())}; wrote the predictions to {out}")
    if inputs.labels is not None:
        unseen = sorted(set(inputs.labels) - set(classifier.classes))
        if unseen:
            count = sum(label in unseen for label in inputs.labels)
            print(f"note: {count} series carry labels the model was not trained on ({', '.join(unseen)}); they "
                  f"count as misclassified")
        print(format_report(classification_report(inputs.labels, predicted, classifier.classes)))
    return 0


def _read_inputs(args):
    """The series named by --data (and --split, --name for a folder), or UsageError."""
    path = Path(args.data)
    try:
        if path.is_dir():
            train_file, test_file = split_files(path, args.name)
            path = train_file if args.split == "train" else test_file
        elif args.split is not None or args.name is not None:
            flag = "--split" if args.split is not None else "--name"
            raise UsageError(f"{flag} chooses a file in a dataset folder, but --data {path} is a file")
        return load_inputs(path)
    except (OSError, ValueError) as exc:  # missing or malformed files: the user's to fix
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from None


def _write_predictions(out: Path, classes, labels, predicted, probabilities: torch.Tensor) -> None:
    """One row per series: its index in the file, its label (when the file has labels), the predicted label and
    the probability of each class (``p_<label>``)."""
    columns = ["index", *(["label"] if labels is not None else []), "predicted", *(f"p_{c}" for c in classes)]
    rows = []
    for i, row in enumerate(probabilities.double().tolist()):
        record = {"index": i, "predicted": predicted[i], **{f"p_{c}": p for c, p in zip(classes, row, strict=True)}}
        if labels is not None:
            record["label"] = labels[i]
        rows.append(record)
    write_csv(out, columns, rows)
