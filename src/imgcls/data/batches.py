"""Mini-batches gathered from an ImageSource; order is a pure function of (seed, epoch)."""

from __future__ import annotations

from typing import Iterator

import torch

from imgcls.data.source import ImageSource, as_source


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per epoch: a resumed run replays exactly the same order and augmentation."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def iterate_batches(source: ImageSource | torch.Tensor, targets: torch.Tensor | None, batch_size: int, *,
                    shuffle: bool = False, generator: torch.Generator | None = None,
                    drop_last: bool = False, indices: torch.Tensor | None = None, skip: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (uint8 NHWC batch, targets) pairs; `indices` restricts to a subset (e.g. a shard);
    `skip` leaves out the first batches of the order (the steps a stopped epoch already took).
    A tensor is read as a TensorSource."""
    source = as_source(source)
    order = indices if indices is not None else torch.arange(len(source))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(skip * batch_size, stop, batch_size):
        idx = order[start:start + batch_size]
        yield source.gather(idx), (targets[idx] if targets is not None else None)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
