"""Resume state: a torch file of tensors, numbers and strings, read back with weights_only=True."""

from __future__ import annotations

import os

import torch

from imgcls import fileio
from imgcls.errors import WeightsError
from imgcls.models.io import load_failure


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Resume state: tensors, numbers, strings and containers only, written atomically."""
    # Through a Python file: a full disk then raises OSError (ENOSPC), which a path hides from torch.
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The saved state; anything that is not plain data (a pickled object, a torn file) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"{path}: unreadable resume checkpoint: {load_failure(exc)}") from None
