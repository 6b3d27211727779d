"""Data layer: read a dataset (CSV + images or class folders), decode once into a cache, split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgcls.data.cache import decode_images, describe_bad, format_bad, storage_side
from imgcls.data.classes import ClassMap, find_class_names
from imgcls.data.images import DEFAULT_RESIZE
from imgcls.data.source import ImageSource
from imgcls.data.table import ImageTable, read_dataset
from imgcls.errors import DataError, OptionError


@dataclass
class Dataset:
    """Decoded images (an ImageSource of uint8 NHWC pixels) with their table rows; targets when labelled."""

    table: ImageTable
    source: ImageSource
    targets: torch.Tensor | None
    classes: ClassMap | None
    bad: list[dict] = field(default_factory=list)
    from_cache: bool = False
    resize: str = DEFAULT_RESIZE  # how images of another shape were fitted to the storage shape

    @property
    def images(self) -> torch.Tensor:
        """All images as one uint8 NHWC tensor (over the memory-mapped cache: no copy), for tests
        and inspection; the library gathers batches through `source`, which any kind of source has."""
        return self.source.images

    @property
    def ids(self) -> list[str]:
        return self.table.ids

    @property
    def channels(self) -> int:
        return self.source.shape[2]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.source.shape[0], self.source.shape[1]


def load_dataset(data_dir: str | os.PathLike, *, classes: ClassMap | None = None,
                 require_labels: bool = True, channels: int | None = None,
                 size: tuple[int, int] | None = None, on_bad: str = "fail",
                 id_column: str | None = None, label_column: str | None = None,
                 csv_path: str | os.PathLike | None = None, use_cache: bool = True,
                 resize: str = DEFAULT_RESIZE, input_side: int | None = None) -> Dataset:
    """Read + decode a dataset; labels are encoded with `classes` or a new stable class map.

    Images are stored at `size` when given (prediction: the training run's storage shape), else
    at their own size when they all share one that fits, else as squares sized for a model input
    of `input_side` px (see cache.storage_side); `resize` fits other shapes (crop / squash / pad)."""
    if on_bad not in ("fail", "skip"):
        raise OptionError(f"on_bad must be 'fail' or 'skip', not {on_bad!r}")
    row_problems: list[dict] = []  # collect every bad row, so 'fail' lists them all at once
    table = read_dataset(data_dir, csv_path=csv_path, id_column=id_column, label_column=label_column,
                         require_labels=require_labels, problems=row_problems)
    decoded = decode_images(table, channels=channels, size=size, bound=storage_side(input_side),
                            policy=resize, on_bad="skip", use_cache=use_cache)
    bad = row_problems + decoded.bad
    if bad and on_bad == "fail":
        raise DataError(format_bad(bad))
    if not decoded.keep:
        raise DataError(f"{table.source}: no usable images ({len(bad)} bad rows; first: {describe_bad(bad[0])})"
                        if bad else f"{table.source}: no images")
    table = table.subset(decoded.keep) if decoded.bad else table
    targets = None
    if table.labels is not None and (require_labels or classes is not None):
        if classes is None:
            classes = ClassMap.from_labels(table.labels, find_class_names(Path(data_dir)))
        targets = torch.from_numpy(classes.encode(table.labels, table.source, table.rows))
    return Dataset(table, decoded.source, targets, classes, bad, decoded.from_cache, resize)
