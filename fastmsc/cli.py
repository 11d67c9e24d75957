"""The ``fastmsc`` command: ``fastmsc info``, ``train``, ``predict``, ``evaluate``, ``bench``.

Each subcommand lives in its own module of :mod:`fastmsc.commands`, which defines ``add_arguments(parser)`` and
``run(args) -> int``, and may define ``main(args) -> int``, called instead of ``run`` to report user errors as one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("fastmsc.commands.info", "print versions and which backend each op uses per device"),
    "train": ("fastmsc.commands.train", "train MSCClassifier on a UCR/UEA dataset or the built-in synthetic one"),
    "predict": ("fastmsc.commands.predict", "classify the series of a .ts/.tsv file or dataset folder with a trained "
                                            "model (a run folder of `fastmsc train`)"),
    "evaluate": ("fastmsc.commands.evaluate", "score a trained model on labelled series: accuracy, per-class "
                                              "precision and recall, confusion matrix"),
    "bench": ("fastmsc.commands.bench", "time every backend of every op and the model's training step"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmsc", description="fused kernels for a multi-scale time-series classifier"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(getattr(module, "main", module.run)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
