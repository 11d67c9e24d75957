"""``fastmsc train``: train MSCClassifier (an ensemble of them by default) on a UCR/UEA dataset or the built-in
synthetic one, with :func:`fastmsc.ensemble.fit_ensemble`.

User errors (bad options, unreadable data, a checkpoint of another run) raise :class:`UsageError`; :func:`main`
prints them as one line ``fastmsc train: error: ...`` and returns 2, as argparse does for its own errors. Under
torchrun (WORLD_SIZE > 1) the process group is initialised here, gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .. import data as data_module
from .._distributed import distributed_world, resolve_device
from ..backend import BACKENDS, set_backend
from ..checkpoint import CheckpointError, CheckpointMismatch
from ..data import SeriesData
from ..ensemble import fit_ensemble
from ..metrics import plot_learning_curves
from ..models import MODEL_FILE, Classifier, MSCClassifier
from ..models import save as save_model
from ._usage import UsageError, check_writable


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
    output.add_argument("--out", metavar="DIR",
                        help="the run folder: the trained model (every ensemble member, its configuration, class "
                             "labels and input normalisation; read by `fastmsc predict` and fastmsc.models.load), "
                             "metrics as JSON and CSV, and a plot of the learning curves (with matplotlib). Default: "
                             "runs/<dataset>-<YYYYmmdd-HHMMSS>")
    output.add_argument("--metrics-json", metavar="PATH", help="write per-epoch metrics as JSON (default: in --out)")
    output.add_argument("--metrics-csv", metavar="PATH", help="write per-epoch metrics as CSV (default: in --out)")
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
    for dest in ("checkpoint", "metrics_json", "metrics_csv"):
        if getattr(args, dest) is not None:
            check_writable(_flag(dest), Path(getattr(args, dest)))
    if args.out is not None:
        _check_run_folder("--out", Path(args.out))


def _check_run_folder(flag: str, path: Path) -> None:
    """Raise :class:`UsageError` unless ``path`` can become the run folder: a new or existing writable folder
    that holds no trained model yet (a finished run is never overwritten)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    if (path / MODEL_FILE).exists():
        raise UsageError(f"{flag} {path} already holds a trained model ({MODEL_FILE}); choose another folder")
    check_writable(flag, path / MODEL_FILE)


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
    """``run(args)`` with user errors (:class:`UsageError`) printed as one line, exit status 2, and a file that
    could not be written during the run as one line, exit status 1."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"fastmsc train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that could not be written during the run (disk full, a folder removed)
        print(f"fastmsc train: error: {exc}", file=sys.stderr)
        return 1


def run(args) -> int:
    """``fastmsc train``; raises :class:`UsageError` for a mistake in the command line (see :func:`main`)."""
    check_arguments(args)
    set_backend(args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device_and_process_group(args)
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

        make_model = _model_maker(args, train)
        meta, model_config = _run_records(args, train, test)
        name = meta["dataset"]
        out = Path(args.out) if args.out is not None else _default_run_folder(name)
        metrics_json = args.metrics_json or out / "metrics.json"
        metrics_csv = args.metrics_csv or out / "metrics.csv"
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
                progress=False if args.quiet else None, log=log, metrics_json=metrics_json,
                metrics_csv=metrics_csv, checkpoint=args.checkpoint, resume=args.resume,
                stop_after=args.stop_after, meta=meta, model_config=model_config)
        except CheckpointError as exc:
            raise _resume_error(exc) from None
        if rank == 0:
            _print_result(args, name, result, time.process_time() - cpu_started)
            _save_run(args, out, train, result)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def _default_run_folder(dataset: str) -> Path:
    """runs/<dataset>-<YYYYmmdd-HHMMSS>, with -2, -3, ... added when a run of the same second has it."""
    stem = Path("runs") / f"{dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = stem, 1
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}-{n}")
    _check_run_folder("the run folder", path)
    return path


def _save_run(args, out: Path, train: SeriesData, result) -> None:
    """The trained model and the learning curves into the run folder (the metrics are there already); a run
    stopped before the end (--stop-after) leaves its metrics only."""
    if not result.complete:
        print(f"metrics in {out}; no model saved: training stopped before the end "
              f"(continue it with --resume{f' {args.checkpoint}' if args.checkpoint else ''} --out {out})")
        return
    classifier = Classifier([r.model for r in result.members], train.classes, "znorm" if args.znorm else "none")
    options = {k: v for k, v in vars(args).items() if k != "command"}
    save_model(classifier, out, training={"dataset": train.name or "synthetic", "options": options,
                                          "final": result.final})
    title = f"{train.name or 'synthetic'}: {len(result.members)} member(s)"
    if not plot_learning_curves([r.history for r in result.members], out / "learning_curves.png", title):
        print("matplotlib is not installed: no learning_curves.png (pip install matplotlib)")
    print(f"saved the model in {out}; classify new series with: fastmsc predict {out} --data PATH")


def _device_and_process_group(args) -> torch.device:
    """``--device`` resolved; under torchrun (WORLD_SIZE > 1) the process group is initialised on it."""
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
    return device


def _model_maker(args, train: SeriesData):
    """``make_model() -> MSCClassifier`` as the options describe it, for :func:`fit_ensemble`."""

    def make_model() -> nn.Module:
        # fit_ensemble seeds torch first: the same initial weights on every rank (DDP also broadcasts rank 0's)
        model = MSCClassifier(train.num_channels, train.num_classes, conv_channels=args.conv_channels,
                              lstm_hidden=args.lstm_hidden, lstm_layers=args.lstm_layers, num_heads=args.heads,
                              classifier_hidden=args.classifier_hidden, dropout=args.dropout,
                              conv_norm=args.conv_norm)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model

    return make_model


def _run_records(args, train: SeriesData, test: SeriesData) -> tuple[dict, dict]:
    """(meta, model_config): what the metrics files record of the run, and what the checkpoint records of the
    model and data (resuming with other values is refused, by option name)."""
    name = train.name or "synthetic"
    meta = {"dataset": name, "classes": list(train.classes), "num_channels": train.num_channels,
            "train_size": len(train), "test_size": len(test), "backend": args.backend,
            "model": {"conv_channels": args.conv_channels, "lstm_hidden": args.lstm_hidden,
                      "lstm_layers": args.lstm_layers, "num_heads": args.heads,
                      "classifier_hidden": args.classifier_hidden, "dropout": args.dropout,
                      "conv_norm": args.conv_norm}}
    # Keyed by option name (heads, not num_heads) so that a refused resume names the option to fix.
    model_config = {**meta["model"], "heads": meta["model"]["num_heads"], "sync_bn": args.sync_bn,
                    "dataset": name, "classes": list(train.classes), "num_channels": train.num_channels,
                    "znorm": args.znorm}
    del model_config["num_heads"]
    if not (args.data or args.dataset):
        model_config.update({k: getattr(args, k) for k in ("synthetic_train", "synthetic_test",
                                                           "synthetic_length", "synthetic_classes",
                                                           "synthetic_variable_length")})
    return meta, model_config


def _print_result(args, name: str, result, cpu: float) -> None:
    """The closing lines: each member's test accuracy (ensembles), then the run's."""
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
