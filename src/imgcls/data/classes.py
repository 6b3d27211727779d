"""Stable class order for raw labels: ints stay ints (numeric order), strings stay strings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.errors import DataError, where


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class ClassMap:
    """Index <-> raw label as written in train.csv, plus human-readable names."""

    labels: tuple[str, ...]
    names: tuple[str, ...]
    integer_labels: bool

    @classmethod
    def from_labels(cls, raw_labels: list[str], names: dict[str, str] | None = None) -> "ClassMap":
        unique = set(raw_labels)
        integer = all(_is_int(x) for x in unique)
        if integer:
            # "03" and "3" are the same class: normalise through int.
            ordered = tuple(str(v) for v in sorted({int(x) for x in unique}))
        else:
            ordered = tuple(sorted(unique))
        names = names or {}
        return cls(ordered, tuple(names.get(label, label) for label in ordered), integer)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def encode(self, raw_labels: list[str], source: Path | None = None,
               rows: list[int] | None = None) -> np.ndarray:
        """Raw labels -> class indices; an unknown label fails naming the file and row."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.empty(len(raw_labels), dtype=np.int64)
        for i, raw in enumerate(raw_labels):
            key = str(int(raw)) if self.integer_labels and _is_int(raw) else raw
            if key not in index:
                row = rows[i] if rows else None
                raise DataError(f"{where(source or 'labels', row)}: label {raw!r} is not a training "
                                f"class (classes: {', '.join(self.labels[:20])})")
            out[i] = index[key]
        return out

    def decode(self, indices) -> list:
        """Indices -> labels in the form train.csv had them (int or str)."""
        return [int(self.labels[i]) if self.integer_labels else self.labels[i] for i in indices]

    def to_json(self) -> dict:
        return {"labels": list(self.labels), "names": list(self.names),
                "integer_labels": self.integer_labels}

    @classmethod
    def from_json(cls, obj: dict) -> "ClassMap":
        return cls(tuple(obj["labels"]), tuple(obj["names"]), bool(obj["integer_labels"]))


def find_class_names(data_dir: Path) -> dict[str, str]:
    """Optional classes.json beside or above the data folder: {label: name} or a list of names."""
    for candidate in (data_dir / "classes.json", data_dir.parent / "classes.json"):
        if candidate.is_file():
            try:
                obj = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{candidate}: not valid JSON ({exc})") from None
            if isinstance(obj, list):
                return {str(i): str(n) for i, n in enumerate(obj)}
            if isinstance(obj, dict):
                return {str(k): str(v) for k, v in obj.items()}
    return {}
