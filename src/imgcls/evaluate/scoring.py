"""Score a run on a labelled folder or against an answer key; write eval.json and the confusion matrix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgcls import fileio
from imgcls.data.table import read_answer_key
from imgcls.errors import DataError
from imgcls.evaluate.metrics import classification_metrics
from imgcls.evaluate.plots import plot_confusion


def targets_from_key(key_file: str | os.PathLike, ids: list[str], classes) -> np.ndarray:
    """Class indices for `ids` from an answer key; unknown ids or labels name the key's row."""
    key = read_answer_key(key_file)
    missing = [i for i in ids if i not in key]
    if missing:
        raise DataError(f"{key_file}: no label for id {missing[0]!r}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    labels = [key[i][0] for i in ids]
    rows = [key[i][1] for i in ids]
    return classes.encode(labels, Path(key_file), rows)


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                 labels: str | os.PathLike | None = None, device: str = "auto", tta: str = "none") -> dict:
    """Predict `data_dir` with the run's model and score it; outputs go into the run folder."""
    from imgcls.predict import load_predictor

    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir, device=device, tta=tta)
    data = predictor.load(data_dir, classes=None if labels else predictor.classes)
    if labels:
        y_true = targets_from_key(labels, data.ids, predictor.classes)
    elif data.targets is not None:
        y_true = data.targets.numpy()
    else:
        raise DataError(f"{data_dir}: has no label column; pass the answer key with --labels")
    proba = predictor.predict_proba(data.images)
    y_pred = proba.argmax(1)
    names = list(predictor.classes.names)
    metrics = classification_metrics(y_true, y_pred, names)
    metrics.update({"data_dir": str(data_dir), "labels": str(labels) if labels else None,
                    "quarantined": len(data.bad), "tta": tta})
    fileio.write_json(run_dir / "eval.json", metrics)
    cm = np.asarray(metrics["confusion"])
    header = "true\\predicted," + ",".join(f'"{n}"' for n in names)
    rows = [f'"{n}",' + ",".join(str(v) for v in row) for n, row in zip(names, cm)]
    fileio.write_text(run_dir / "confusion.csv", "\n".join([header, *rows]) + "\n")
    plot_confusion(cm, names, run_dir / "confusion.png",
                   title=f"{predictor.model_info['name']}: accuracy {metrics['accuracy']:.4f}")
    return metrics
