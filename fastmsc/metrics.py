"""Metrics: per epoch of :func:`fastmsc.train.fit` (the JSON and CSV files, the line logged per epoch, a plot of
the learning curves), and the scores of predictions against labels (:func:`classification_report`).

A row is a dict with the keys :data:`METRIC_COLUMNS`; ``test_loss`` and ``test_acc`` are None in epochs where
the test split was not scored.
"""

from __future__ import annotations

from ._files import replace_atomically, write_csv, write_json

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


def plot_learning_curves(histories: list[list[dict]], path, title: str = "") -> bool:
    """Draw the loss and accuracy per epoch (training, and test where scored) of each member's ``history`` into
    the PNG ``path``. Returns False, drawing nothing, when matplotlib is not installed (an optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for m, history in enumerate(histories):
        label = f"member {m}" if len(histories) > 1 else ""
        for axes, key in ((loss_axes, "loss"), (acc_axes, "acc")):
            epochs = [row["epoch"] for row in history]
            axes.plot(epochs, [row[f"train_{key}"] for row in history], color=f"C{m}", label=f"train {label}".strip())
            scored = [row for row in history if row.get(f"test_{key}") is not None]
            if scored:
                axes.plot([row["epoch"] for row in scored], [row[f"test_{key}"] for row in scored], color=f"C{m}",
                          linestyle="--", marker="o", markersize=3, label=f"test {label}".strip())
    for axes, name in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    replace_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return True


def classification_report(labels, predicted, classes) -> dict:
    """Scores of ``predicted`` against the true ``labels`` (two equal-length sequences of label strings).

    Returns ``accuracy``, ``count``, ``classes`` (the given ``classes``, then any true label outside them, in
    order of appearance: a series of such a label is always misclassified), ``per_class`` (one dict per class:
    ``precision``, ``recall`` (None where undefined: nothing predicted, or no series, of that class) and
    ``support``) and ``confusion`` (rows: true class, columns: predicted class, in ``classes`` order).
    """
    labels, predicted = [str(label) for label in labels], [str(label) for label in predicted]
    if len(labels) != len(predicted):
        raise ValueError(f"labels and predicted must have one entry per series, got {len(labels)} and "
                         f"{len(predicted)}")
    names = list(classes)
    names += [label for label in dict.fromkeys(labels) if label not in names]
    index = {name: k for k, name in enumerate(names)}
    unknown = [label for label in dict.fromkeys(predicted) if label not in index]
    if unknown:
        raise ValueError(f"predicted labels {unknown} are not among the classes {list(classes)}")
    confusion = [[0] * len(names) for _ in names]
    for label, guess in zip(labels, predicted, strict=True):
        confusion[index[label]][index[guess]] += 1
    per_class = []
    for k, name in enumerate(names):
        hits, predicted_k, support = confusion[k][k], sum(row[k] for row in confusion), sum(confusion[k])
        per_class.append({"class": name, "precision": hits / predicted_k if predicted_k else None,
                          "recall": hits / support if support else None, "support": support})
    correct = sum(confusion[k][k] for k in range(len(names)))
    return {"accuracy": correct / len(labels) if labels else None, "count": len(labels), "classes": names,
            "per_class": per_class, "confusion": confusion}


def format_report(report: dict) -> str:
    """:func:`classification_report` as lines of text: accuracy, a precision/recall table, the confusion matrix."""
    def score(value):
        return "   n/a" if value is None else f"{value:6.4f}"

    accuracy = "n/a" if report["accuracy"] is None else f"{report['accuracy']:.4f}"
    correct = sum(report["confusion"][k][k] for k in range(len(report["classes"])))
    width = max([5, *(len(name) for name in report["classes"])])
    lines = [f"accuracy {accuracy} ({correct}/{report['count']} series)", "",
             f"{'class':<{width}}  precision  recall  support"]
    for row in report["per_class"]:
        lines.append(f"{row['class']:<{width}}     {score(row['precision'])}  {score(row['recall'])}  "
                     f"{row['support']:>7}")
    cell = max([4, *(len(name) for name in report["classes"]), *(len(str(n)) for r in report["confusion"] for n in r)])
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * width + "  " + " ".join(f"{name:>{cell}}" for name in report["classes"])]
    for name, row in zip(report["classes"], report["confusion"], strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)
