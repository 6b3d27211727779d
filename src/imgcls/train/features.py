"""Cached-feature training for the head strategy: the frozen backbone runs once, epochs cost only the head."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgcls.data.batches import epoch_generator, num_batches
from imgcls.data.source import ImageSource, as_source
from imgcls.data.transforms import Preprocess
from imgcls.train import loop
from imgcls.runtime import Runtime
from imgcls.train.budget import PACED_FLOOR, Deadline, PacedStop, epochs_that_fit, paced_slices
from imgcls.train.optim import StepSchedule, build_optimizer

# Features of larger sets live in a memory-mapped temporary file (page cache, not anonymous
# memory): 50,000 images x 1,280 float32 features are 256 MB, which would grow with the set.
FEATURES_IN_MEMORY_BYTES = 64 * 1024 * 1024


# Feature batches under a deadline: small enough that the pass ends close to it on a slow CPU
# (256 Lite0 images at 96 px can take 20 s on a busy 2-core machine), large enough to stay efficient.
# Near the deadline a batch is cut further, to what ends in time, but not below PACED_FLOOR images.
DEADLINE_BATCH = 64


@dataclass
class FeatureCache:
    """Pooled backbone features (float32, CPU) of the train and validation images, in index order."""

    train: torch.Tensor
    train_targets: torch.Tensor
    val: torch.Tensor
    val_targets: torch.Tensor
    seconds: float
    seeded_rows: int | None = None
    """Under a deadline: how many images of the seeded train + val order have features (None: all
    of them, computed in index order)."""
    left_out: int = 0
    """Images a deadline left without features."""
    val_rows: torch.Tensor | None = None
    """Under a deadline: the positions in the validation split of `val`'s rows (None: all, in order)."""


def feature_rows(rows: int, width: int) -> torch.Tensor:
    """An uninitialised float32 rows x width tensor: in memory when small, else over a temporary
    file (under TMPDIR) that is unlinked at once, so its pages are file-backed and freed with it."""
    if rows * width * 4 <= FEATURES_IN_MEMORY_BYTES:
        return torch.empty(rows, width)
    fd, name = tempfile.mkstemp(prefix="imgcls-features-", suffix=".f32")
    os.close(fd)
    try:
        array = np.memmap(name, dtype=np.float32, mode="w+", shape=(rows, width))
    finally:
        os.unlink(name)
    return torch.from_numpy(array)


@torch.no_grad()
def pooled_features(model: nn.Module, images: ImageSource, indices: torch.Tensor, *, preprocess: Preprocess,
                    runtime: Runtime, batch_size: int = 256, desc: str = "features",
                    pace: PacedStop | None = None) -> torch.Tensor:
    """What the classifier sees (global-pooled, pre-logits) for the indexed images, backbone in eval mode.

    Each batch is written into one preallocated result (no list of batches joined at the end,
    which held the features twice). Under a `pace` the batches are cut to what ends in time and
    the pass may end early: the rows then cover a prefix of `indices` (never none of them, so
    there is always something to train on)."""
    model.eval()
    images, out = as_source(images), None
    slices = paced_slices(len(indices), batch_size, pace, least=PACED_FLOOR)
    bar = tqdm(total=len(indices), desc=desc, leave=False, unit="img",
               disable=loop.PROGRESS_DISABLE)  # read at call time: torchrun sets it for ranks > 0
    start = 0
    for part in slices:
        x = preprocess(images.gather(indices[part]), runtime.device, runtime.channels_last)
        with runtime.autocast():
            features = model.forward_head(model.forward_features(x), pre_logits=True).float().cpu()
        if out is None:
            out = feature_rows(len(indices), features.shape[1])
        out[start:start + len(features)] = features
        start += len(features)
        bar.update(len(features))
    bar.close()
    return out[:start] if out is not None else torch.empty(0)  # a stopped pass fills a prefix


def build_feature_cache(model: nn.Module, images: ImageSource, targets: torch.Tensor, train_idx: torch.Tensor,
                        val_idx: torch.Tensor, *, preprocess: Preprocess, runtime: Runtime,
                        deadline: Deadline | None = None, seed: int = 0, cut_at: int | None = None,
                        clock: Callable[[], float] = time.perf_counter) -> FeatureCache:
    """Features of the training and validation images.

    Under a `deadline` (a time budget), or to redo a pass one cut (`cut_at`, on resume), both sets go
    through in one order drawn from `seed` and the pass ends before a batch that would not finish
    in time: what was computed is then a random sample of each set, never one class or one end of
    the data. A pass that ends is back in index order, as without a deadline.
    """
    start = clock()
    kw = dict(preprocess=preprocess, runtime=runtime)
    if deadline is None and cut_at is None:
        train = pooled_features(model, images, train_idx, desc="train features", **kw)
        val = pooled_features(model, images, val_idx, desc="val features", **kw)
        return FeatureCache(train, targets[train_idx], val, targets[val_idx], clock() - start)
    both = torch.cat([train_idx, val_idx])
    order = torch.randperm(len(both), generator=torch.Generator().manual_seed(seed))[:cut_at]
    pace = PacedStop(deadline) if deadline is not None else None
    rows = pooled_features(model, images, both[order], desc="features", pace=pace, batch_size=DEADLINE_BATCH, **kw)
    done, where = order[:len(rows)].sort()  # back in index order: train rows first, as both is
    rows, is_train = rows[where], done < len(train_idx)
    return FeatureCache(rows[is_train], targets[both[done[is_train]]], rows[~is_train],
                        targets[both[done[~is_train]]], clock() - start, len(done), len(both) - len(done),
                        done[~is_train] - len(train_idx))


def head_dropout(model: nn.Module) -> float:
    """The dropout rate the model applies between pooling and classifier in training."""
    if hasattr(model, "head_dropout"):
        return float(model.head_dropout)
    drop = getattr(model, "drop", None)
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


def train_head_epoch(model: nn.Module, cache: FeatureCache, *, optimizer: torch.optim.Optimizer,
                     batch_size: int, generator: torch.Generator, runtime: Runtime, drop_last: bool,
                     label_smoothing: float = 0.0, on_step: Callable[[], None] | None = None) -> dict:
    """One epoch of the classifier on cached features, in the batch order the full loop would use.

    The permutation draws from the same per-epoch generator as iterate_batches, and dropout has the
    same shapes in the same order, so on a fixed seed the head equals the uncached one.
    """
    head, p_drop = model.get_classifier(), head_dropout(model)
    head.train()
    order = torch.randperm(len(cache.train), generator=generator)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for first in range(0, stop, batch_size):
        idx = order[first:first + batch_size]
        if on_step is not None:
            on_step()
        x = cache.train[idx].to(runtime.device)
        y = cache.train_targets[idx].to(runtime.device)
        with runtime.autocast(training=True):
            logits = head(F.dropout(x, p_drop, training=True) if p_drop > 0 else x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "images": seen,
            "seconds": elapsed, "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate_head(model: nn.Module, features: torch.Tensor, targets: torch.Tensor, runtime: Runtime) -> dict:
    """Validation on cached features: same numbers as evaluate() through the frozen backbone."""
    head = model.get_classifier().eval()
    with runtime.autocast():
        logits = head(features.to(runtime.device)).float().cpu()
    if len(targets) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "logits": logits}
    return {"loss": F.cross_entropy(logits, targets).item(),
            "acc": (logits.argmax(1) == targets).float().mean().item(), "logits": logits}


def probe_head(model: nn.Module, cache: FeatureCache, *, epochs: int, lr: float, weight_decay: float,
               batch_size: int, seed: int, runtime: Runtime, label_smoothing: float = 0.0,
               schedule: str = "onecycle", deadline: Deadline | None = None) -> dict:
    """Fit the classifier alone on cached features, with its own AdamW and schedule: the linear
    probe of LP-FT, run before the backbone trains. Returns the last epoch's train stats, the
    epochs run and the validation accuracy.

    Under a `deadline` the schedule is sized, from each epoch's cost, to the epochs that end in time
    (at least one), so a cut probe still anneals instead of stopping at its peak learning rate."""
    head = model.get_classifier()
    optimizer = build_optimizer([{"name": "head", "params": list(head.parameters()), "lr": lr}], weight_decay)
    drop_last = len(cache.train) > batch_size
    steps = StepSchedule(optimizer, schedule, num_batches(len(cache.train), batch_size, drop_last), epochs)
    stats: dict = {}
    epoch = 0
    while epoch < steps.epochs:
        # Its own stream: the probe must not share batch orders with the fine-tune epochs.
        generator = epoch_generator(seed, -1 - epoch)
        stats = train_head_epoch(model, cache, optimizer=optimizer, batch_size=batch_size, generator=generator,
                                 runtime=runtime, drop_last=drop_last, label_smoothing=label_smoothing,
                                 on_step=steps)
        epoch += 1
        if deadline is not None:
            fits = epochs_that_fit(deadline.left_s(), epoch, 0.0, stats["seconds"], steps.epochs)
            steps.epochs = min(steps.epochs, fits)
    val = evaluate_head(model, cache.val, cache.val_targets, runtime)
    return {**stats, "epochs": epoch, "val_acc": val["acc"], "val_loss": val["loss"], "val_logits": val["logits"]}
