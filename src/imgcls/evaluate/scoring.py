"""Score a run on a labelled folder or against an answer key; write eval.json and the confusion matrix."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from imgcls.data.table import read_answer_key
from imgcls.errors import DataError
from imgcls.evaluate.metrics import classification_metrics
from imgcls.evaluate.plots import plot_confusion
from imgcls.predict import load_predictor
from imgcls.train.run_folder import RunFolder


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


def fixed_subset(n: int, limit: int | None) -> np.ndarray:
    """Fixed indices into the test set (seed 0, sorted): every run scored with a limit sees the same images."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike,
                 labels: str | os.PathLike | None = None, device: str = "auto", tta: str = "none",
                 limit: int | None = None, keep_proba: bool = False) -> dict:
    """Predict `data_dir` (or its fixed subset of `limit` images) with the run's model and score it.

    Writes eval.json, confusion.csv and confusion.png into the run folder, and with `keep_proba`
    the probabilities that compare's report draws its confident mistakes from.
    """
    folder = RunFolder(run_dir)
    predictor = load_predictor(folder.path, device=device, tta=tta)
    data = predictor.load(data_dir, classes=None if labels else predictor.classes)
    idx = fixed_subset(len(data.ids), limit)
    if labels:
        y_true = targets_from_key(labels, [data.ids[i] for i in idx], predictor.classes)
    elif data.targets is not None:
        y_true = data.targets.numpy()[idx]
    else:
        raise DataError(f"{data_dir}: has no label column; pass the answer key with --labels")
    t0 = time.perf_counter()
    proba = predictor.predict_proba(data.source.subset(idx))
    seconds = time.perf_counter() - t0
    names = list(predictor.classes.names)
    metrics = classification_metrics(y_true, proba.argmax(1), names)
    metrics.update({"data_dir": str(data_dir), "labels": str(labels) if labels else None,
                    "quarantined": len(data.bad), "tta": tta, "test_limit": limit,
                    "predict_images_per_s": round(len(idx) / max(seconds, 1e-9), 1)})
    if keep_proba:
        folder.write_test_proba(proba, idx, y_true)
    folder.write_eval(metrics)
    cm = np.asarray(metrics["confusion"])
    folder.write_confusion_csv(cm, names)
    plot_confusion(cm, names, folder.confusion_png,
                   title=f"{predictor.model_info['name']}: accuracy {metrics['accuracy']:.4f}")
    return metrics
