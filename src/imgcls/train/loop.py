"""The training loop as two plain functions: train_one_epoch and evaluate."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from imgcls.data.transforms import Augment, Preprocess
from imgcls.runtime import Runtime

# None lets tqdm decide (bars on a terminal only); distributed ranks other than 0 set True.
PROGRESS_DISABLE: bool | None = None


def train_one_epoch(model: nn.Module, batches: Iterable, *, optimizer: torch.optim.Optimizer,
                    preprocess: Preprocess, runtime: Runtime, generator: torch.Generator,
                    augment: Augment | None = None, label_smoothing: float = 0.0,
                    on_step: Callable[[], None] | None = None, total: int | None = None,
                    desc: str = "train", train_mode: Callable[[nn.Module], None] | None = None) -> dict:
    """One pass over `batches` of (uint8 images, targets); returns loss, accuracy and images/s."""
    # train_mode lets a strategy keep frozen BatchNorm in eval mode (see models/freeze.py).
    (train_mode or nn.Module.train)(model)
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    seen, start = 0, time.perf_counter()
    bar = tqdm(batches, total=total, desc=desc, leave=False, disable=PROGRESS_DISABLE, unit="batch")
    for step, (images, targets) in enumerate(bar):
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
        loss_sum += loss.detach().double().cpu() * len(y)
        hard = y if y.dim() == 1 else y.argmax(1)  # distillation targets are probabilities
        correct += (logits.detach().argmax(1) == hard).sum().cpu()
        seen += len(y)
        if step % 20 == 0 and not bar.disable:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            img_s=f"{seen / max(elapsed, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    if not math.isfinite(loss_sum.item()):
        raise FloatingPointError("training loss became NaN/inf; lower --lr or use --precision fp32")
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "images": seen, "seconds": elapsed, "images_per_s": seen / max(elapsed, 1e-9)}


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
