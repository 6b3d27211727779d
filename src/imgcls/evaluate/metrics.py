"""Classification metrics: arrays in, plain dicts out."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_metrics(y_true, y_pred, class_names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    per_class = [{"class": class_names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(k)]
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "count": int(len(y_true)),
        "per_class": per_class,
        "confusion": cm.tolist(),
    }


def format_table(metrics: dict) -> str:
    """Per-class table plus accuracy, for the terminal."""
    width = max(12, *(len(c["class"]) for c in metrics["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c in metrics["per_class"]:
        lines.append(f"{c['class']:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  "
                     f"{c['f1']:5.4f}  {c['support']:7d}")
    lines.append(f"{'accuracy':<{width}}  {metrics['accuracy']:.4f} on {metrics['count']} images; "
                 f"macro-F1 {metrics['macro_f1']:.4f}")
    return "\n".join(lines)
