"""Figures written as PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls import fileio  # noqa: E402


def plot_confusion(cm: np.ndarray, class_names: list[str], path: str | os.PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix with counts, saved atomically."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k), dpi=100)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
