"""AdamW with per-group learning rates, and step-wise schedules that survive a resume."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from imgcls.errors import OptionError


def build_optimizer(groups: list[dict], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over param groups {"name", "params", "lr"}; norms and biases get no decay."""
    param_groups = []
    for group in groups:
        decay = [p for p in group["params"] if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in group["params"] if p.requires_grad and p.ndim <= 1]
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                param_groups.append({"params": params, "lr": group["lr"], "base_lr": group["lr"],
                                     "weight_decay": wd, "name": group["name"] + suffix})
    if not param_groups:
        raise OptionError("no trainable parameters: the strategy froze the whole model")
    # foreach kernels are the fastest CPU path for many small tensors.
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay, foreach=True)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_frac: float = 0.15) -> float:
    """Multiplier of each group's base lr at `step` (0-based) of `total_steps`."""
    return lr_at(schedule, min(step / max(total_steps, 1), 1.0), warmup_frac)


def lr_at(schedule: str, progress: float, warmup_frac: float = 0.15) -> float:
    """Multiplier of each group's base lr at `progress` (0 to 1) through the schedule."""
    if schedule == "onecycle":
        # Linear warm-up from 4% to 100%, then cosine to ~0: one-cycle without momentum cycling.
        if progress < warmup_frac:
            return 0.04 + 0.96 * progress / warmup_frac
        rest = (progress - warmup_frac) / (1 - warmup_frac)
        return 0.5 * (1 + math.cos(math.pi * rest)) * (1 - 1e-3) + 1e-3
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress)) * (1 - 1e-3) + 1e-3
    if schedule == "constant":
        return 1.0
    raise OptionError(f"unknown schedule {schedule!r}; valid: onecycle, cosine, constant")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class StepSchedule:
    """The learning rate of every optimizer step: called before each step (the on_step hook of
    train_one_epoch and train_head_epoch), it sets each group's lr to its base lr x the factor
    for the current step, then counts the step.

    `epochs` is the plan; a time budget may change it during the run, in whole epochs (`epochs`)
    or in steps (`total_steps`, which may end inside an epoch). A new plan takes the schedule on
    from where it stands: the steps left cover the rest of its progress, so the learning rate
    never jumps, whether the plan grew or shrank; it only anneals more slowly or faster.
    `anchor` is (step, progress) where the current plan took over; (0, 0) until a plan changes,
    where progress is step / total_steps. `step` starts where a resumed run left off.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, steps_per_epoch: int, epochs: int,
                 step: int = 0, total_steps: int | None = None, anchor: tuple[int, float] | None = None):
        self.optimizer, self.name, self.steps_per_epoch = optimizer, name, steps_per_epoch
        self._total = total_steps if total_steps is not None else epochs * steps_per_epoch
        self.step = step
        self.anchor = (int(anchor[0]), float(anchor[1])) if anchor else (0, 0.0)

    @property
    def total_steps(self) -> int:
        return self._total

    @total_steps.setter
    def total_steps(self, steps: int) -> None:
        if steps != self._total:
            self.anchor = (self.step, self.progress())
            self._total = steps

    def progress(self) -> float:
        """How far through the schedule the next step is, 0 to 1."""
        start, done = self.anchor
        return min(done + (self.step - start) / max(self._total - start, 1) * (1 - done), 1.0)

    @property
    def epochs(self) -> int:
        """The epochs the plan's steps reach into (a last part epoch counts)."""
        return -(-self.total_steps // max(self.steps_per_epoch, 1))

    @epochs.setter
    def epochs(self, epochs: int) -> None:
        self.total_steps = epochs * self.steps_per_epoch

    def __call__(self) -> None:
        set_lr(self.optimizer, lr_at(self.name, self.progress()))
        self.step += 1


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
