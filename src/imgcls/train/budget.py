"""Sizing a run's schedule to a wall-clock budget, from measured step and epoch times, and the
deadline that stops the feature pass, the head probe and the training steps where the budget ends."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from typing import Callable, Iterator

# Steps timed before a budgeted run sizes its schedule: waiting for the end of the first epoch
# would run that epoch on a schedule planned for --epochs (the compare grid preset asks for 30
# epochs and fits about 6: its first epoch warmed up to a quarter of the peak lr, the second
# started at the peak).
EARLY_ESTIMATE_STEPS = 8

# The smallest batch a paced pass (features, validation) runs: its first, which times the pace,
# and the last it cuts to what ends in time. Smaller batches would cost more per image.
PACED_FLOOR = 8


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
    Every epoch may correct the plan either way: StepSchedule takes a new plan on from where the
    learning rate stands, so it never jumps. (When later epochs could only shrink the plan, one
    slow first epoch, the machine busy for a moment, cut the whole run short: README.)

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
        return fitted

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

    This session's share starts when the user's wait began (`start`; by default now) and is
    accounted by phase (mark), so run.json can say where the time went. Without a budget it only
    times the run: left_s() is infinite and nothing ever stops.
    """

    def __init__(self, budget_s: float | None, spent_s: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                 start: float | None = None):
        self.budget_s, self.spent_s, self.clock = budget_s, spent_s, clock
        self.start = clock() if start is None else start  # when this session's share began
        self.end = None if budget_s is None else self.start + budget_s - spent_s
        self.phases: dict[str, float] = {}
        self.marked = self.start
        self.counted_from = "the train call"  # what `start` is, in words, for run.json

    def elapsed_s(self) -> float:
        return self.spent_s + self.clock() - self.start

    def left_s(self) -> float:
        return math.inf if self.end is None else self.end - self.clock()

    def add_spent(self, seconds: float) -> None:
        """Time earlier sessions of a resumed run spent: it was the budget's too."""
        self.spent_s += seconds
        if self.end is not None:
            self.end -= seconds

    def mark(self, phase: str) -> float:
        """Count the time since the last mark (or the start) as `phase`'s; returns it. The phases
        of a session add up to its time."""
        now = self.clock()
        spent, self.marked = now - self.marked, now
        self.phases[phase] = self.phases.get(phase, 0.0) + spent
        return spent

    def within(self, share: float) -> "Deadline":
        """The same clock and run time, ending once `share` of the time now left is spent: a phase's
        part of the budget (the feature pass leaves the rest to the epochs that train on it)."""
        part = Deadline(None, self.spent_s, self.clock, self.start)
        part.budget_s = self.budget_s
        if self.end is not None:
            part.end = self.clock() + share * max(self.left_s(), 0.0)
        return part


class PacedStop:
    """Sizes each unit of work (a batch of images, a training step) to what ends in time.

    A unit's cost is its size times the median cost per item of the last few units measured
    (before any is, `prior_s()` per item: 0 unless the caller knows better), plus `reserve_s()`:
    what must still run after the last unit (the validation of a stopped epoch, the saving)."""

    def __init__(self, deadline: Deadline, reserve_s: Callable[[], float] = lambda: 0.0, window: int = 5,
                 prior_s: Callable[[], float] = lambda: 0.0):
        self.deadline, self.reserve_s, self.prior_s = deadline, reserve_s, prior_s
        self.costs: deque[float] = deque(maxlen=window)  # seconds per item
        self.last: float | None = None
        self.last_size = 0

    def item_cost_s(self) -> float:
        """Measured, else the prior: what the reserve of the work before it is sized by."""
        return statistics.median(self.costs) if self.costs else self.prior_s()

    def unit_cost_s(self) -> float:
        """What one item costs: for training steps (units of one step), a step."""
        return self.item_cost_s()

    def tick(self) -> None:
        """The unit under way has ended: measure it. The next unit's clock starts now."""
        now = self.deadline.clock()
        if self.last is not None and self.last_size > 0:
            self.costs.append((now - self.last) / self.last_size)
        self.last, self.last_size = now, 0

    def pause(self) -> None:
        """What follows is not a unit (the training between two validation passes): not measured."""
        self.last, self.last_size = None, 0

    def take(self, most: int, least: int = 1) -> int:
        """Measure the unit just ended and size the next: the most items, up to `most`, that end in
        time with the reserve after them; 0 when not even `least` do."""
        self.tick()
        left = self.deadline.left_s() - self.reserve_s()
        per_item = statistics.median(self.costs) if self.costs else 0.0
        if per_item <= 0:  # nothing measured yet (a prior is only a guess): the smallest unit times the pace
            fits = min(most, least)
        else:
            fits = most if left >= most * per_item else int(max(left, 0.0) // per_item)
        if left <= 0 or fits < min(least, most):
            fits = 0
        self.last_size = fits
        return fits

    def __call__(self) -> bool:
        """A stop hook for units of one (training steps): True when the next does not end in time."""
        return self.take(1) == 0


def paced_slices(n: int, batch_size: int, pace: PacedStop | None, least: int) -> Iterator[slice]:
    """Consecutive slices of range(n), batch_size long. Under a `pace`, each is cut to what ends in
    time, so a pass never starts a batch that cannot end before the deadline where a smaller one
    would; the pass stops once not even `least` items fit, but never before its first `least`
    items, which also time the pace (a pass always has some result)."""
    start = 0
    if pace is not None:
        pace.pause()
    while start < n:
        size = min(batch_size, n - start)
        if pace is not None:
            fits = pace.take(size, least)
            if fits == 0 and start > 0:
                break
            size = fits or min(least, size)
            pace.last_size = size
        yield slice(start, start + size)
        start += size
    if pace is not None:
        pace.tick()


def process_age_s() -> float:
    """Seconds since this process started, as the OS records it (Linux: /proc); 0 where it does
    not say. What a command's user has waited for before its first line of Python ran."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # The fields after the command name, which may hold spaces, start at field 3.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            since_boot = float(uptime.read().split()[0])
        return max(since_boot - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0
