"""``fastmsc evaluate RUN_DIR --data PATH``: ``fastmsc predict`` on labelled series, which must carry labels; prints
the accuracy, per-class precision and recall and the confusion matrix, and writes the predictions."""

from __future__ import annotations

from . import predict

add_arguments = predict.add_arguments


def main(args) -> int:
    return predict.main(args, require_labels=True)


def run(args) -> int:
    return predict.run(args, require_labels=True)
