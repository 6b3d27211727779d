"""Decode a dataset's images once into a uint8 array cached on disk, so epochs never decode PNGs."""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls import fileio
from imgcls.data.images import image_channels, load_image, open_image
from imgcls.data.table import ImageTable
from imgcls.errors import DataError, OptionError, where

CACHE_VERSION = 1


@dataclass
class DecodedImages:
    """N x H x W x C uint8 images for the table's rows that decoded, plus what was skipped."""

    array: np.ndarray
    keep: list[int]  # positions in the table that decoded
    bad: list[dict] = field(default_factory=list)  # {"id", "file", "row", "reason"}
    from_cache: bool = False


def cache_root(table: ImageTable) -> Path:
    """Beside the data (`.imgcls_cache/`), or IMGCLS_CACHE_DIR when set (read-only datasets)."""
    env = os.environ.get("IMGCLS_CACHE_DIR")
    if env:
        return Path(env)
    base = table.source.parent if table.source.is_file() else table.source
    return base / ".imgcls_cache"


def fingerprint(table: ImageTable, channels: int | None, size: tuple[int, int] | None) -> str:
    """Changes whenever the CSV, any image file (size or mtime) or the decode settings change."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{channels}|{size}".encode())
    if table.source.is_file():
        h.update(table.source.read_bytes())
    for image_id, label, path in zip(table.ids, table.labels or [""] * len(table), table.paths):
        try:
            st = path.stat()
            h.update(f"{image_id}|{label}|{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{image_id}|{path}|missing\n".encode())
    return h.hexdigest()[:24]


def describe_row(table: ImageTable, i: int) -> str:
    """'images/x.png (train.csv row 12)': where a bad image comes from."""
    row = table.row_of(i)
    origin = f" ({where(table.source.name, row)})" if row is not None else ""
    return f"{table.paths[i]}{origin}"


def probe_layout(table: ImageTable, positions: list[int]) -> tuple[int, tuple[int, int]]:
    """Channels (1 if every image is grey) and the most common size, from headers only."""
    grey, sizes = True, collections.Counter()
    for i in positions:
        image = open_image_header(table, i)
        if image is None:
            continue
        grey &= image_channels(image) == 1
        sizes[(image.height, image.width)] += 1
    if not sizes:
        return 1, (1, 1)
    return (1 if grey else 3), sizes.most_common(1)[0][0]


def open_image_header(table: ImageTable, i: int):
    try:
        from PIL import Image
        with Image.open(table.paths[i]) as image:
            image.size  # noqa: B018 - header read only
            return image
    except Exception:  # noqa: BLE001 - reported properly by the full decode pass
        return None


def decode_images(table: ImageTable, *, channels: int | None = None, size: tuple[int, int] | None = None,
                  on_bad: str = "fail", use_cache: bool = True) -> DecodedImages:
    """All images as one uint8 array, from the cache when its fingerprint still matches."""
    if on_bad not in ("fail", "skip"):
        raise OptionError(f"on_bad must be 'fail' or 'skip', not {on_bad!r}")
    key = fingerprint(table, channels, size)
    cache_file = cache_root(table) / f"{table.source.stem}-{key}.npz"
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                keep, bad_rows = z["keep"].tolist(), z["bad"].tolist()
                decoded = DecodedImages(z["images"], keep, [_bad_from_json(b) for b in bad_rows], True)
            _check_bad(decoded, on_bad)
            return decoded
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    decoded = _decode_all(table, channels, size)
    if use_cache:
        _write_cache(cache_file, decoded)
    _check_bad(decoded, on_bad)
    return decoded


def _decode_all(table: ImageTable, channels: int | None, size: tuple[int, int] | None) -> DecodedImages:
    probe_channels, probe_size = probe_layout(table, list(range(len(table))))
    channels = channels or probe_channels
    size = tuple(size) if size else probe_size
    array = np.zeros((len(table), size[0], size[1], channels), dtype=np.uint8)
    keep, bad = [], []
    for i in range(len(table)):
        try:
            array[len(keep)] = load_image(table.paths[i], channels, size, describe_row(table, i))
            keep.append(i)
        except DataError as exc:
            bad.append({"kind": "bad_image", "id": table.ids[i], "file": str(table.paths[i]),
                        "row": table.row_of(i), "csv": table.source.name if table.rows else None,
                        "reason": str(exc).split(": ", 1)[-1]})
    return DecodedImages(array[: len(keep)], keep, bad)


def _check_bad(decoded: DecodedImages, on_bad: str) -> None:
    if decoded.bad and on_bad == "fail":
        raise DataError(format_bad(decoded.bad))


def describe_bad(bad: dict) -> str:
    """One line per bad row: 'images/x.png (train.csv row 3): truncated ...' or 'train.csv row 3: ...'."""
    if bad.get("csv") and bad.get("row"):
        return f"{bad['file']} ({bad['csv']} row {bad['row']}): {bad['reason']}"
    return f"{bad['file']}" + (f" row {bad['row']}" if bad.get("row") else "") + f": {bad['reason']}"


def format_bad(bad: list[dict], limit: int = 20) -> str:
    """The error text listing bad rows: one line when there is one, else a capped list."""
    lines = [describe_bad(b) for b in sorted(bad, key=lambda b: (b.get("row") or 0, b["file"]))]
    if len(lines) == 1:
        return lines[0]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return (f"{len(lines)} bad rows or images:\n  " + "\n  ".join(lines[:limit]) + more
            + "\n(fix them, or use --on-bad-image skip to train without them)")


def _bad_from_json(text: str) -> dict:
    import json
    return json.loads(text)


def _write_cache(cache_file: Path, decoded: DecodedImages) -> None:
    import json
    try:
        for stale in cache_file.parent.glob(cache_file.name.rsplit("-", 1)[0] + "-*.npz"):
            stale.unlink(missing_ok=True)
        with fileio.atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=decoded.array, keep=np.asarray(decoded.keep, dtype=np.int64),
                         bad=np.asarray([json.dumps(b) for b in decoded.bad], dtype=str))
    except OSError:
        pass  # a read-only dataset folder only costs a re-decode next time
