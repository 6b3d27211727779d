"""Where decoded images come from: one small protocol, so a batch never needs the whole set in memory.

An ImageSource has a length, a storage shape, gathers a batch of indices into a uint8 NHWC tensor
and computes channel statistics in bounded memory. Today's two kinds: images already in a tensor
(TensorSource) and the memory-mapped decode cache (MemmapSource: the operating system's page cache
holds the pixels, shared by every process that reads the file). A streaming reader of tar shards
would be one more subclass: it implements `__len__`, `shape` and `gather` (sequential reads) and
may compute `channel_stats` over a sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

# Channel statistics read this many bytes of pixels at a time (bounded memory whatever the set size),
# after a direct float32 computation up to STATS_FLOAT_BYTES.
STATS_CHUNK_BYTES = 32 * 1024 * 1024
STATS_FLOAT_BYTES = 64 * 1024 * 1024


class ImageSource:
    """The protocol; `channel_stats` is shared, built on `gather`."""

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every stored image."""
        raise NotImplementedError

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x C for the given positions, in their order."""
        raise NotImplementedError

    def channel_stats(self, indices: torch.Tensor | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (unbiased) std of pixels / 255 over the indexed images.

        Up to STATS_FLOAT_BYTES of float pixels they are computed in float32 at once, as they always
        were (recorded weights of small runs depend on those exact bits); beyond, from exact 256-bin
        histograms gathered a chunk at a time, so memory stays bounded whatever the set size."""
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).long()
        h, w, c = self.shape
        if len(order) * h * w * c * 4 <= STATS_FLOAT_BYTES:
            pixels = self.gather(order).float().div_(255)
            return tuple(pixels.mean(dim=(0, 1, 2)).tolist()), tuple(pixels.std(dim=(0, 1, 2)).tolist())
        per_chunk = max(1, STATS_CHUNK_BYTES // (h * w * c))
        counts = np.zeros((c, 256), dtype=np.int64)
        for start in range(0, len(order), per_chunk):
            pixels = self.gather(order[start:start + per_chunk]).numpy().reshape(-1, c)
            for channel in range(c):
                counts[channel] += np.bincount(pixels[:, channel], minlength=256)
        values = np.arange(256, dtype=np.float64) / 255.0
        n = counts.sum(axis=1).astype(np.float64)
        mean = counts @ values / n
        var = (counts @ values ** 2 - n * mean ** 2) / np.maximum(n - 1, 1)
        return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(np.maximum(var, 0.0)))

    def subset(self, indices: torch.Tensor) -> "SubsetSource":
        return SubsetSource(self, indices)


class SubsetSource(ImageSource):
    """Some positions of another source, in the given order (a test subset, a shard): a view, no copy."""

    def __init__(self, base: ImageSource, indices: torch.Tensor):
        self.base = base
        self.indices = torch.as_tensor(indices).long()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.base.gather(self.indices[torch.as_tensor(indices).long()])


class TensorSource(ImageSource):
    """Images already decoded into one uint8 NHWC tensor (small sets, tests, uploads)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[torch.as_tensor(indices).long()]


def as_source(images: "ImageSource | torch.Tensor") -> ImageSource:
    """A source as it is; a uint8 NHWC tensor (an upload, an API array) as a TensorSource."""
    return images if isinstance(images, ImageSource) else TensorSource(torch.as_tensor(images))


class MemmapSource(TensorSource):
    """A raw N x H x W x C uint8 file mapped into memory: pages are read on demand and shared
    between processes, so resident anonymous memory does not grow with the number of images.
    `images` is a tensor over the mapping (no copy) for code that still indexes it directly."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int, int]):
        self.path = Path(path)
        # Copy-on-write mapping: writable as torch.from_numpy wants, but the file is never changed.
        array = np.memmap(self.path, dtype=np.uint8, mode="c", shape=tuple(shape)) if shape[0] else \
            np.zeros(tuple(shape), dtype=np.uint8)
        super().__init__(torch.from_numpy(array))
        self.array = array


class ConcatSource(ImageSource):
    """Several sources of one storage shape end to end (a training set and its pseudo-labelled
    extra images): positions past the first source's length index the next, and so on."""

    def __init__(self, parts: list[ImageSource]):
        shapes = {part.shape for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"sources of different storage shapes cannot be joined: {sorted(shapes)}")
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parts[0].shape

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        order = torch.as_tensor(indices).long()
        part_of = np.searchsorted(self.starts, order.numpy(), side="right") - 1
        out = torch.empty((len(order), *self.shape), dtype=torch.uint8)
        for k, part in enumerate(self.parts):
            rows = np.flatnonzero(part_of == k)
            if len(rows):
                out[torch.from_numpy(rows)] = part.gather(order[rows] - int(self.starts[k]))
        return out
