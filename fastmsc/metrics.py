"""Per-epoch metrics of :func:`fastmsc.train.fit`: the JSON and CSV files and the line logged per epoch.

A row is a dict with the keys :data:`METRIC_COLUMNS`; ``test_loss`` and ``test_acc`` are None in epochs where
the test split was not scored.
"""

from __future__ import annotations

from ._files import write_csv, write_json

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s")


def write_metrics(history: list[dict], config: dict, meta: dict, json_path, csv_path) -> None:
    """Rewrite the run's metrics files (either path may be None): JSON ``{meta, config, epochs, final}``, CSV one
    line per epoch."""
    if json_path:
        final = history[-1] if history else {}
        config = {k: v for k, v in config.items() if k != "model_repr"}  # in the checkpoint only: many lines
        write_json(json_path, {"meta": meta, "config": config, "epochs": history, "final": final})
    if csv_path:
        write_csv(csv_path, METRIC_COLUMNS, history)


def format_epoch(row: dict, epochs: int) -> str:
    """One line: the epoch of ``epochs``, learning rate, training loss and accuracy, test scores if any, time."""
    text = (f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.4f}  "
            f"train acc {row['train_acc']:.4f}")
    if row.get("test_acc") is not None:
        text += f"  test loss {row['test_loss']:.4f}  test acc {row['test_acc']:.4f}"
    return text + f"  ({row['epoch_time_s']:.1f}s)"
