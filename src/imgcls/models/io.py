"""Model weight files: safetensors written atomically, and state dicts read back without unpickling code."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imgcls import fileio
from imgcls.errors import WeightsError


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors, atomically; tied tensors are cloned so the format accepts them."""
    state = {k: v.detach().contiguous().clone().cpu() for k, v in model.state_dict().items()}
    with fileio.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file with weights_only=True (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise WeightsError(f"{path}: {load_failure(exc)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return obj


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (e.g. the epoch a model file comes from)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a valid safetensors file ({exc})") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex digest of a file's bytes: ties an export or a run to the exact weights it used."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_failure(exc: Exception) -> str:
    """Why torch.load(weights_only=True) failed, in one line: torch's own text runs to several and
    advises weights_only=False, which is exactly what must not be done with a file one did not make."""
    if isinstance(exc, pickle.UnpicklingError):
        return ("refused to load: not a weights-only file (it holds Python objects besides tensors, "
                "and unpickling them could run code)")
    first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[:1]
    return f"not a torch weights file ({type(exc).__name__}: {first_line[0] if first_line else 'no details'})"
