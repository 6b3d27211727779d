"""Multi-process training under torchrun: DistributedDataParallel with the single-process data order.

Every rank draws the same per-epoch permutation (data/batches.py) and keeps its own slice of each
global batch, so `--batch-size` is the global batch and a run sees the samples in the same steps
whatever the number of processes. Only rank 0 writes the run folder and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from imgcls.data.batches import iterate_batches
from imgcls.data.source import ImageSource
from imgcls.errors import ImgclsError
from imgcls.train import loop

SHARD_LOG_ENV = "IMGCLS_SHARD_LOG"
"""A folder: every rank appends the dataset positions of each batch it trains on (for tests and audits)."""


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of n items: disjoint, covering, sizes differ by at most 1."""
    return rank * n // world_size, (rank + 1) * n // world_size


def shard(items: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous slice, in order, so concatenating the ranks' slices gives `items` back."""
    start, stop = shard_bounds(len(items), rank, world_size)
    return items[start:stop]


@dataclasses.dataclass
class Dist:
    """This process's place in the job; the defaults describe a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    _ddp: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        """Equal local batches make DDP's gradient average the global-batch mean."""
        if batch_size % self.world_size:
            raise ImgclsError(f"--batch-size {batch_size} is the global batch and must divide evenly "
                              f"over {self.world_size} processes")

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier(device_ids=[self.local_rank]) if self.device.type == "cuda" else tdist.barrier()

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 only and hand its result (or its exception) to every rank."""
        if not self.enabled:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = (True, fn())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank, so all stop alike
                box[0] = (False, exc)
        tdist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it builds shared caches), the others then read them."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def same_everywhere(self, value: Any) -> Any:
        """Rank 0's value on every rank (e.g. epochs fitted to a time budget from local timings)."""
        return self.from_main(lambda: value) if self.enabled else value

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP over the parameters that train now, rebuilt when a strategy changes which ones do.

        DDP registers its gradient hooks for the parameters that require grad when it is built:
        one unfrozen later (finetune after its warm-up) would silently train on local gradients only.
        """
        if not self.enabled:
            return model
        trainable = tuple(p.requires_grad for p in model.parameters())
        if self._ddp is None or self._ddp[0] != trainable or self._ddp[1].module is not model:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self._ddp = (trainable, DistributedDataParallel(model, device_ids=ids))
        return self._ddp[1]

    def rank_streams(self, generator: torch.Generator) -> torch.Generator:
        """Own dropout and augmentation streams per rank: shared ones would repeat masks across ranks."""
        if not self.enabled:
            return generator
        seed = generator.initial_seed() * 1009 + self.rank + 1
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed)

    def iterate_batches(self, images: ImageSource, targets: torch.Tensor, batch_size: int, *,
                        shuffle: bool = False, generator: torch.Generator | None = None,
                        drop_last: bool = False, indices: torch.Tensor | None = None, skip: int = 0) -> Iterator:
        """data.batches.iterate_batches, each global batch cut down to this rank's slice."""
        if not self.enabled:
            yield from iterate_batches(images, targets, batch_size, shuffle=shuffle, generator=generator,
                                       drop_last=drop_last, indices=indices, skip=skip)
            return
        # Iterating positions instead of pixels gives the exact single-process order without copying images.
        positions = torch.arange(len(images))
        log = self._shard_log(shuffle)
        for idx, _ in iterate_batches(positions, None, batch_size, shuffle=shuffle, generator=generator,
                                      drop_last=drop_last, indices=indices, skip=skip):
            mine = shard(idx, self.rank, self.world_size)
            if log is not None:
                log.write(json.dumps(mine.tolist()) + "\n")
            yield images.gather(mine), targets[mine]
        if log is not None:
            log.close()

    def _shard_log(self, shuffle: bool):
        folder = os.environ.get(SHARD_LOG_ENV)
        if not folder or not shuffle:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return open(Path(folder) / f"rank{self.rank}.jsonl", "a")

    def _sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the backend's device)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def after_train_epoch(self, model: nn.Module, stats: dict) -> dict:
        """Global loss/accuracy/throughput, and rank 0's BatchNorm statistics everywhere before evaluating."""
        if not self.enabled:
            return stats
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)
        n = stats["images"]
        loss_sum, correct, images = self._sum([stats["loss"] * n, stats["acc"] * n, n])
        seconds = torch.tensor([stats["seconds"]], dtype=torch.float64, device=self.device)
        tdist.all_reduce(seconds, op=tdist.ReduceOp.MAX)  # the epoch lasts as long as the slowest rank
        images = max(int(round(images)), 1)
        return {**stats, "loss": loss_sum / images, "acc": round(correct) / images, "images": images,
                "seconds": seconds.item(), "images_per_s": images / max(seconds.item(), 1e-9)}

    def reduce_eval(self, result: dict) -> dict:
        """Validation loss and accuracy over all ranks' shards (logits stay per rank)."""
        if not self.enabled:
            return result
        n = len(result["logits"])
        has = n > 0  # an empty shard reports NaN: it must not poison the sum
        loss_sum, correct, total = self._sum([result["loss"] * n if has else 0.0,
                                             result["acc"] * n if has else 0.0, n])
        if total == 0:
            return {**result, "loss": float("nan"), "acc": float("nan")}
        return {**result, "loss": loss_sum / total, "acc": round(correct) / total}

    def feature_cache(self, build: Callable, model: nn.Module, images: ImageSource, targets: torch.Tensor,
                      train_idx: torch.Tensor, val_idx: torch.Tensor, **kwargs):
        """The head strategy's feature cache: each rank runs the backbone on its shard, all get everything."""
        if not self.enabled:
            return build(model, images, targets, train_idx, val_idx, **kwargs)
        local = build(model, images, targets, shard(train_idx, self.rank, self.world_size),
                      shard(val_idx, self.rank, self.world_size), **kwargs)
        seconds = max(self.from_all(local.seconds))
        return dataclasses.replace(local, train=self.gather_rows(local.train), train_targets=targets[train_idx],
                                   val=self.gather_rows(local.val), val_targets=targets[val_idx], seconds=seconds)

    def from_all(self, value: Any) -> list:
        """Every rank's value, in rank order."""
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, value)
        return out

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows in rank order (shards may differ in length by one)."""
        counts = self.from_all(len(rows))
        width = rows.shape[1:] if rows.ndim > 1 else ()
        padded = torch.zeros((max(counts), *width), dtype=torch.float32, device=self.device)
        padded[:len(rows)] = rows.to(self.device, torch.float32)
        parts = [torch.empty_like(padded) for _ in counts]
        tdist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def launched_distributed() -> bool:
    """torchrun (and other launchers) announce the job through WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def init_distributed(device: str = "auto") -> Dist:
    """The process group from torchrun's environment: nccl on GPUs, gloo on CPU; no-op for one process."""
    if not launched_distributed():
        return Dist()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _wants_cuda(device)
    if cuda and local >= torch.cuda.device_count():
        raise ImgclsError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                          f"use --nproc_per_node at most the GPU count")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(dev)
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if rank != 0:
        loop.PROGRESS_DISABLE = True  # one set of progress bars, from rank 0
    return Dist(rank, world, local, dev)


def is_main_process() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def shutdown_distributed() -> None:
    """Leave the process group cleanly (torch warns about a group left open at exit).

    All ranks first meet at a barrier: a rank that tore its gloo connections down while rank 0
    was still writing run.json aborted at exit now and then ("terminate called without an
    active exception", exit code -6, seen in about 1 of 6 two-process test runs).
    """
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
