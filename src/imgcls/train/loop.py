"""The training loop as two plain functions: train_one_epoch and evaluate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgcls.data.transforms import Augment, Preprocess
from imgcls.runtime import Runtime

# None lets tqdm decide (bars on a terminal only); distributed ranks other than 0 set True.
PROGRESS_DISABLE: bool | None = None


@dataclass
class EpochPosition:
    """How far an epoch got before it stopped: its steps, the sums its metrics are made of, and the
    random streams (augmentation, dropout) as they stand before its next step. With the epoch's
    batch order, which is a function of (seed, epoch), that is all it takes to finish the epoch
    later exactly as if it had never stopped."""

    steps: int = 0
    loss_sum: float = 0.0  # float64 sum of loss x batch size: exact as a Python float
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    augment_rng: torch.Tensor | None = None
    torch_rng: torch.Tensor | None = None

    def to_checkpoint(self) -> dict:
        return {"steps": self.steps, "loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "seconds": self.seconds, "augment_rng": self.augment_rng, "torch_rng": self.torch_rng}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "EpochPosition":
        return cls(**saved)

    def restore_streams(self, generator: torch.Generator) -> None:
        if self.augment_rng is not None:
            generator.set_state(self.augment_rng)
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)


def train_one_epoch(model: nn.Module, batches: Iterable, *, optimizer: torch.optim.Optimizer,
                    preprocess: Preprocess, runtime: Runtime, generator: torch.Generator,
                    augment: Augment | None = None, label_smoothing: float = 0.0,
                    on_step: Callable[[], None] | None = None, total: int | None = None,
                    desc: str = "train", train_mode: Callable[[nn.Module], None] | None = None,
                    stop: Callable[[], bool] | None = None, start: EpochPosition | None = None,
                    after_step: Callable[[], None] | None = None) -> dict:
    """One pass over `batches` of (uint8 images, targets); returns loss, accuracy and images/s.

    on_step runs before each step (the learning-rate schedule), after_step after each optimizer
    step (the weight average). `stop`, asked before each step, ends the epoch early; "position" in
    the result then says where (stopped True). `start` continues a stopped epoch: `batches` must
    skip its first start.steps batches, and its random streams are restored once the first batch
    is read, since the batch order is drawn from `generator` when that happens."""
    # train_mode lets a strategy keep frozen BatchNorm in eval mode (see models/freeze.py).
    (train_mode or nn.Module.train)(model)
    begin = start or EpochPosition()
    loss_sum = torch.tensor(begin.loss_sum, dtype=torch.float64)
    correct = torch.tensor(begin.correct, dtype=torch.int64)
    seen, clock_start, stopped = begin.seen, time.perf_counter(), False
    bar = tqdm(batches, total=total, initial=begin.steps, desc=desc, leave=False, disable=PROGRESS_DISABLE,
               unit="batch")
    steps = begin.steps
    for images, targets in bar:
        if start is not None and steps == begin.steps:
            start.restore_streams(generator)
        if stop is not None and stop():
            stopped = True
            break
        if on_step is not None:
            on_step()
        x = preprocess(images, runtime.device, runtime.channels_last, augment=augment, generator=generator)
        y = targets.to(runtime.device, non_blocking=True)
        with runtime.autocast(training=True):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach().double().cpu() * len(y)
        hard = y if y.dim() == 1 else y.argmax(1)  # distillation targets are probabilities
        correct += (logits.detach().argmax(1) == hard).sum().cpu()
        seen += len(y)
        steps += 1
        if steps % 20 == 1 and not bar.disable:
            elapsed = time.perf_counter() - clock_start
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            img_s=f"{(seen - begin.seen) / max(elapsed, 1e-9):.0f}")
    bar.close()
    elapsed = time.perf_counter() - clock_start
    if not math.isfinite(loss_sum.item()):
        raise FloatingPointError("training loss became NaN/inf; lower --lr or use --precision fp32")
    position = EpochPosition(steps, loss_sum.item(), int(correct.item()), seen, begin.seconds + elapsed,
                             generator.get_state(), torch.get_rng_state())
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "images": seen, "seconds": position.seconds, "images_per_s": seen / max(position.seconds, 1e-9),
            "stopped": stopped, "position": position}


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Iterable, *, preprocess: Preprocess,
                   runtime: Runtime, total: int | None = None, desc: str = "predict") -> torch.Tensor:
    """Logits (float32, on CPU) for every batch of uint8 images."""
    model.eval()
    outputs = []
    for images, _ in tqdm(batches, total=total, desc=desc, leave=False, disable=PROGRESS_DISABLE, unit="batch"):
        x = preprocess(images, runtime.device, runtime.channels_last)
        with runtime.autocast():
            outputs.append(model(x).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def evaluate(model: nn.Module, batches: Iterable, *, preprocess: Preprocess, runtime: Runtime,
             total: int | None = None) -> dict:
    """Loss and accuracy over labelled batches, plus the logits for further metrics."""
    batches = list(batches)
    targets = torch.cat([t for _, t in batches]) if batches else torch.empty(0, dtype=torch.long)
    logits = predict_logits(model, batches, preprocess=preprocess, runtime=runtime,
                            total=total, desc="evaluate")
    if len(targets) == 0:
        return {"loss": float("nan"), "acc": float("nan"), "logits": logits}
    loss = F.cross_entropy(logits, targets).item()
    acc = (logits.argmax(1) == targets).float().mean().item()
    return {"loss": loss, "acc": acc, "logits": logits}
