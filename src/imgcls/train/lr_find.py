"""Learning-rate range test (fastai's lr_find): train a few steps at exponentially growing learning
rates, watch the smoothed loss, and suggest the rate where it falls fastest for longest ("valley")."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn as nn

from imgcls.config import TrainConfig
from imgcls.data import Dataset
from imgcls.data.batches import epoch_generator, iterate_batches
from imgcls.data.transforms import Augment, Preprocess, parse_augment
from imgcls.models.freeze import train_mode
from imgcls.runtime import Runtime
from imgcls.train.loop import train_one_epoch
from imgcls.train.optim import build_optimizer, set_lr
from imgcls.train.strategies import get_strategy, param_groups_for

# fastai's defaults: 100 steps from 1e-7 to 10, stop once the smoothed loss passes 4x its best.
START_LR, END_LR, STEPS, DIVERGED = 1e-7, 10.0, 100, 4.0
SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected


@dataclass
class LrFinding:
    """The learning rates tried, their smoothed losses and the suggested rate."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    suggestion: float | None = None

    def to_json(self) -> dict:
        return {"suggestion": self.suggestion, "steps": len(self.lrs),
                "lrs": [float(f"{x:.4g}") for x in self.lrs], "losses": [round(x, 5) for x in self.losses]}


def valley(lrs: list[float], losses: list[float]) -> float | None:
    """The rate two thirds of the way into the longest stretch over which the loss keeps falling.

    fastai's `valley` suggestion: more robust than the minimum (too late: the loss is about to blow
    up) or the steepest point (noisy on a few hundred images).
    """
    n = len(losses)
    if n < 3:
        return None
    longest = [1] * n  # longest decreasing subsequence ending at i
    best_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[i] > longest[best_end]:
            best_end = i
    start = best_end - longest[best_end]
    third = (best_end - start) / 3
    return lrs[max(0, min(n - 1, int(start + third + third / 2)))]


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """Exponentially spaced rates from `start` to `end`."""
    ratio = (end / start) ** (1 / max(steps - 1, 1))
    return [start * ratio ** i for i in range(steps)]


def lr_range_test(model: nn.Module, batches: Iterator, *, optimizer: torch.optim.Optimizer,
                  preprocess: Preprocess, runtime: Runtime, generator: torch.Generator,
                  augment: Augment | None = None, label_smoothing: float = 0.0,
                  train_mode: Callable[[nn.Module], None] | None = None,
                  start_lr: float = START_LR, end_lr: float = END_LR, steps: int = STEPS) -> LrFinding:
    """Run the test on `batches` (cycled as needed); the model and optimizer are restored afterwards.

    The rates are multipliers of each group's base_lr relative to the first group's, so a backbone
    at a fraction of the head's rate keeps that fraction.
    """
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    head_base = optimizer.param_groups[0]["base_lr"]
    finding, smoothed, best = LrFinding(), 0.0, math.inf
    try:
        for step, lr in enumerate(lr_schedule(start_lr, end_lr, steps)):
            set_lr(optimizer, lr / head_base)
            stats = train_one_epoch(model, [next(batches)], optimizer=optimizer, preprocess=preprocess,
                                    runtime=runtime, generator=generator, augment=augment,
                                    label_smoothing=label_smoothing, train_mode=train_mode)
            smoothed = SMOOTHING * smoothed + (1 - SMOOTHING) * stats["loss"]
            loss = smoothed / (1 - SMOOTHING ** (step + 1))
            finding.lrs.append(lr)
            finding.losses.append(loss)
            best = min(best, loss)
            if loss > DIVERGED * best:
                break
    except FloatingPointError:
        pass  # the loss overflowed: the test has gone past every usable rate
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    skip = len(finding.lrs) // 10  # the first steps barely move the weights: their loss says nothing
    finding.suggestion = valley(finding.lrs[skip:], finding.losses[skip:])
    return finding


def run_range_test(config: TrainConfig, model: nn.Module, data: Dataset, train_idx: torch.Tensor,
                   preprocess: Preprocess, runtime: Runtime) -> LrFinding:
    """The range test on the run's own training images, batch size, augmentation and parameter
    groups (a backbone keeps its share of the head's rate). `config` has its sizes resolved; the
    test is seeded, so a resumed run finds the same rate again."""
    n_train = len(train_idx)
    torch.manual_seed(config.seed)
    optimizer = build_optimizer(param_groups_for(model, config.replace(lr=1.0)), config.weight_decay)
    strategy = get_strategy(config.strategy)
    drop_last = n_train > config.batch_size
    # Beyond its epochs' batches the test goes on with new epochs' orders (kept apart from the run's).
    batches = (batch for epoch in itertools.count()
               for batch in iterate_batches(data.source, data.targets, config.batch_size, shuffle=True,
                                            generator=epoch_generator(config.seed, -10_000 - epoch),
                                            drop_last=drop_last, indices=train_idx))
    return lr_range_test(model, batches, optimizer=optimizer, preprocess=preprocess, runtime=runtime, generator=torch.Generator().manual_seed(config.seed),
                         augment=parse_augment(config.augment, n_train, min(data.image_size)),
                         label_smoothing=config.label_smoothing,
                         train_mode=partial(train_mode, bn_stats=strategy.bn_stats(config, n_train)))


def curve_table(finding: LrFinding, rows: int = 12) -> str:
    """The curve as a few lines of text: learning rate, smoothed loss, and the suggestion marked."""
    if not finding.lrs:
        return "no step finished"
    picks = sorted({round(i * (len(finding.lrs) - 1) / max(rows - 1, 1)) for i in range(rows)})
    if finding.suggestion in finding.lrs:
        picks = sorted(set(picks) | {finding.lrs.index(finding.suggestion)})
    lines = ["lr          loss"]
    for i in picks:
        mark = "  <- suggestion" if finding.lrs[i] == finding.suggestion else ""
        lines.append(f"{finding.lrs[i]:<11.3g} {finding.losses[i]:.4f}{mark}")
    return "\n".join(lines)
