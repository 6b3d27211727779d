"""One rule for turning raw labels into classes.

- Surrounding spaces never matter.
- The usual missing-value markers (MISSING_LABELS, any case: empty, `NaN`, `N/A`, `NA`, `null`,
  `None`, `-`, ...) are missing labels, reported with their file and row; never a class.
- Strings that denote the same number are one class (`1`, `01`, `1.0`, `+1`, `1e0`), whatever else
  the column holds; the class is written in its shortest plain form (`1`, `2.5`, `0.001`).
- Classes are ordered numbers first (by value), then the other labels in code-point order, so the
  order depends only on the set of classes, never on the order of the rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from imgcls.errors import DataError, where

MISSING_LABELS = frozenset({"", "-", "?", "na", "n/a", "#n/a", "nan", "null", "none"})
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"-?\d+", re.ASCII)
# Beyond this many digits a number is written in scientific notation rather than spelled out.
_PLAIN_DIGITS = 30


def is_missing_label(text: str) -> bool:
    """True for an empty cell or a missing-value marker such as NaN, N/A or null."""
    return text.strip().casefold() in MISSING_LABELS


def _number(text: str) -> Decimal | None:
    """The number a label denotes (exactly: 0.1 and 0.10000000000000001 stay apart), or None."""
    return Decimal(text) if _NUMBER.fullmatch(text) else None


def _written_form(value: Decimal) -> str:
    """The one way a numeric class is written: no sign on zero, no leading or trailing zeros."""
    value = value.normalize()
    if abs(value.adjusted()) > _PLAIN_DIGITS:
        return str(value)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


def class_key(raw: str) -> str:
    """The class a raw label belongs to, in its written form (see the module docstring)."""
    text = raw.strip()
    value = _number(text)
    return text if value is None else _written_form(value)


def _class_order(key: str) -> tuple:
    value = _number(key)
    return (0, value) if value is not None else (1, key)


@dataclass(frozen=True)
class ClassMap:
    """Index <-> class (a label in its written form, see class_key), plus human-readable names."""

    labels: tuple[str, ...]
    names: tuple[str, ...]
    integer_labels: bool

    @classmethod
    def from_labels(cls, raw_labels: list[str], names: dict[str, str] | None = None) -> "ClassMap":
        """The classes of a label column; missing-value markers are left out (they are no class)."""
        keys = {class_key(x) for x in raw_labels if not is_missing_label(x)}
        ordered = tuple(sorted(keys, key=_class_order))
        integer = all(_INTEGER.fullmatch(k) for k in ordered)
        names = {class_key(k): v for k, v in (names or {}).items()}
        return cls(ordered, tuple(names.get(label, label) for label in ordered), integer)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def encode(self, raw_labels: list[str], source: Path | None = None,
               rows: list[int] | None = None) -> np.ndarray:
        """Raw labels -> class indices; a missing or unknown label fails naming the file and row."""
        index = {label: i for i, label in enumerate(self.labels)}
        for i, label in enumerate(self.labels):  # maps saved before the rule may hold '01' or '1.0'
            index.setdefault(class_key(label), i)
        out = np.empty(len(raw_labels), dtype=np.int64)
        for i, raw in enumerate(raw_labels):
            found = index.get(raw, index.get(class_key(raw)))
            if found is None:
                at = where(source or "labels", rows[i] if rows else None)
                if is_missing_label(raw):
                    raise DataError(f"{at}: missing label ({raw!r} marks a missing value)")
                raise DataError(f"{at}: label {raw!r} is not a training "
                                f"class (classes: {', '.join(self.labels[:20])})")
            out[i] = found
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
