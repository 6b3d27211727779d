"""Stratified, seeded train/validation split, reproducible from (labels, fraction, seed)."""

from __future__ import annotations

import numpy as np

from imgcls.errors import OptionError


def stratified_split(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class gives round(fraction * n) images, at least 1 when n >= 2."""
    if not 0.0 <= val_fraction < 1.0:
        raise OptionError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        rng.shuffle(members)
        n_val = int(round(val_fraction * len(members)))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


def per_class_subset(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """At most `per_class` indices of each class, seeded: for data-efficiency experiments."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        rng.shuffle(members)
        picked.extend(members[:per_class])
    return np.sort(np.asarray(picked, dtype=np.int64))
