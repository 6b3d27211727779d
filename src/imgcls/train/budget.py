"""Sizing a run's schedule to a wall-clock budget, from measured step and epoch times, and the
deadline that stops the feature pass, the head probe and the training steps where the budget ends."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Callable

# Steps timed before a budgeted run sizes its schedule: waiting for the end of the first epoch
# would run that epoch on a schedule planned for --epochs (the compare quick preset asks for 30
# epochs and fits about 6: its first epoch warmed up to a quarter of the peak lr, the second
# started at the peak).
EARLY_ESTIMATE_STEPS = 8


def epochs_that_fit(budget_s: float, done: int, elapsed_s: float, epoch_cost_s: float, at_most: int) -> int:
    """The one budget rule: `done` epochs have taken `elapsed_s`; as many more as the rest of the
    budget holds at `epoch_cost_s` each, never more than `at_most` in all nor fewer than done."""
    if math.isinf(budget_s):
        return at_most
    more = math.floor((budget_s - elapsed_s) / max(epoch_cost_s, 1e-6))
    return int(min(at_most, done + max(more, 0)))


def steps_that_fit(budget_s: float, done: int, elapsed_s: float, step_s: float, validation_s: float,
                   steps_per_epoch: int, at_most: int) -> int:
    """The same rule counted in optimizer steps: `done` steps have taken `elapsed_s`; as many more as
    the rest of the budget holds at `step_s` each plus `validation_s` for every epoch they end, the
    last (part) epoch's included, never more than `at_most` in all nor fewer than done."""
    if math.isinf(budget_s):
        return at_most
    left, step = budget_s - elapsed_s, done
    while step < at_most:
        epoch_end = min((step // steps_per_epoch + 1) * steps_per_epoch, at_most)
        whole = (epoch_end - step) * step_s + validation_s
        if whole <= left:  # the rest of this epoch and its validation fit
            left, step = left - whole, epoch_end
            continue
        # Part of it: the validation that ends the run after the last step must fit too.
        return step + max(math.floor((left - validation_s) / max(step_s, 1e-9)), 0)
    return at_most


class BudgetPlanner:
    """Sizes a budgeted run's schedule in optimizer steps after a few steps of its first
    representative epoch, and again from each epoch's measured cost, so that the learning rate
    anneals to its end value where the budget ends, at a step inside an epoch where need be
    (`whole_epochs` rounds every plan down to whole epochs, for epochs that cannot stop inside).
    The first full epoch may correct the early estimate either way (the schedule is still warming
    up); later epochs only shrink the plan, so the annealing learning rate never jumps back up.

    Epochs before `first_representative_epoch` (a finetune warm-up trains only the head) say
    nothing about the cost of the epochs after them and are not measured. Without a budget every
    method leaves the plan as it is.
    """

    def __init__(self, budget_s: float | None, max_epochs: int, first_representative_epoch: int,
                 steps_per_epoch: int, n_train: int, n_val: int, clock: Callable[[], float] = time.perf_counter,
                 whole_epochs: bool = False):
        self.budget_s = budget_s
        self.max_steps = max_epochs * steps_per_epoch
        self.first_epoch = first_representative_epoch
        self.steps_per_epoch = steps_per_epoch
        # A validation pass is forward only: about a third of a training step per image.
        self.eval_share = n_val / max(n_train, 1) / 3
        self.clock = clock
        self.whole_epochs = whole_epochs
        self.stamps: list[float] = []

    def early(self, epoch: int, step_in_epoch: int, elapsed_s: float, planned: int) -> int | None:
        """Called before each step: after EARLY_ESTIMATE_STEPS timed steps of the first
        representative epoch, the steps that fit (step 0 is not timed: it warms caches up).
        None at every other step; the same steps on every rank, so the caller may synchronise.
        `elapsed_s` is the run's time before this epoch; `planned` the steps planned so far."""
        if (not self.budget_s or epoch != self.first_epoch
                or self.steps_per_epoch <= EARLY_ESTIMATE_STEPS + 1):
            return None
        if 1 <= step_in_epoch <= EARLY_ESTIMATE_STEPS + 1:
            self.stamps.append(self.clock())
        if step_in_epoch != EARLY_ESTIMATE_STEPS + 1 or len(self.stamps) != EARLY_ESTIMATE_STEPS + 1:
            return None
        # The median step: a pause of the machine during a few of them must not shrink the plan
        # for the whole run (the first full epoch can only correct it once that epoch is spent).
        per_step = statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        done = epoch * self.steps_per_epoch + step_in_epoch
        return min(planned, self._fit(done, elapsed_s + per_step * step_in_epoch, per_step))

    def after_epoch(self, epoch: int, elapsed_s: float, planned: int, epoch_cost_s: float) -> int:
        """The steps planned once `epoch` (0-based) has cost `epoch_cost_s` (its validation
        included); `elapsed_s` counts it."""
        if not self.budget_s or epoch < self.first_epoch:
            return planned
        per_step = epoch_cost_s / (self.steps_per_epoch * (1 + self.eval_share))
        fitted = self._fit((epoch + 1) * self.steps_per_epoch, elapsed_s, per_step)
        return fitted if epoch == self.first_epoch else min(planned, fitted)

    def _fit(self, done: int, elapsed_s: float, per_step: float) -> int:
        validation_s = per_step * self.steps_per_epoch * self.eval_share
        steps = steps_that_fit(self.budget_s, done, elapsed_s, per_step, validation_s, self.steps_per_epoch,
                               self.max_steps)
        if self.whole_epochs:  # never fewer than the epoch under way
            spe = self.steps_per_epoch
            steps = max(steps // spe * spe, -(-done // spe) * spe)
        return steps


class Deadline:
    """A run's time on its clock: what earlier sessions spent plus this one's, against the budget.

    Without a budget it only times the run: left_s() is infinite and nothing ever stops.
    """

    def __init__(self, budget_s: float | None, spent_s: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                 start: float | None = None):
        self.budget_s, self.spent_s, self.clock = budget_s, spent_s, clock
        self.start = clock() if start is None else start  # when this session's share began
        self.end = None if budget_s is None else self.start + budget_s - spent_s

    def elapsed_s(self) -> float:
        return self.spent_s + self.clock() - self.start

    def left_s(self) -> float:
        return math.inf if self.end is None else self.end - self.clock()

    def within(self, share: float) -> "Deadline":
        """The same clock and run time, ending once `share` of the time now left is spent: a phase's
        part of the budget (the feature pass leaves the rest to the epochs that train on it)."""
        part = Deadline(None, self.spent_s, self.clock, self.start)
        part.budget_s = self.budget_s
        if self.end is not None:
            part.end = self.clock() + share * max(self.left_s(), 0.0)
        return part


class PacedStop:
    """A stop hook that asks before each unit of work (a batch, a step) whether one more ends in
    time, the unit's cost being the median of the last few measured (before any is, only a deadline
    already past stops), plus `reserve_s()`: what must still run after the stop (the validation of a stopped epoch)."""

    def __init__(self, deadline: Deadline, reserve_s: Callable[[], float] = lambda: 0.0, window: int = 5):
        self.deadline, self.reserve_s = deadline, reserve_s
        self.costs: deque[float] = deque(maxlen=window)
        self.last: float | None = None

    def unit_cost_s(self) -> float:
        return statistics.median(self.costs) if self.costs else 0.0

    def __call__(self) -> bool:
        now = self.deadline.clock()
        if self.last is not None:
            self.costs.append(now - self.last)
        self.last = now
        return self.deadline.left_s() < self.unit_cost_s() + self.reserve_s()
