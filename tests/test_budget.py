"""Time budgets, timed by an injected clock: the behaviour is the same on an idle or a busy machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgcls.config import TrainConfig
from imgcls.train import runner
from imgcls.train.budget import BudgetPlanner, epochs_that_fit
from imgcls.train.optim import StepSchedule, lr_factor
from imgcls.train.strategies import get_strategy

STEP_S = 0.04  # what one optimizer step costs on the fake clock; validation costs nothing


class StepClock:
    """Fake time that advances only when an optimizer step is taken."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def step_clock(monkeypatch: pytest.MonkeyPatch) -> StepClock:
    clock = StepClock()

    class TimedSchedule(StepSchedule):
        def __call__(self) -> None:
            super().__call__()
            clock.now += STEP_S

    monkeypatch.setattr(runner, "StepSchedule", TimedSchedule)
    return clock


def test_time_budget_sizes_the_schedule_within_the_first_epoch(csv_dataset: Path, tmp_path: Path,
                                                               step_clock: StepClock) -> None:
    """The first epoch must already run on the schedule of the epochs that fit, not of --epochs."""
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=2000,
                         time_budget_s=3.0, batch_size=2, precision="fp32", lr=1e-3)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=step_clock)
    steps = info["data"]["train"] // 2
    epoch_s = steps * STEP_S
    # The budget holds 3 s / 0.64 s = 4 epochs, and the run stops there.
    assert steps == 16 and info["epochs"] == int(3.0 // epoch_s) == 4
    assert info["train_seconds"] == pytest.approx(4 * epoch_s) and info["train_seconds"] <= 3.0
    # The first epoch's last step already had the lr of a 4-epoch schedule, 20x that of a 2000-epoch one.
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(1e-3 * lr_factor("onecycle", steps - 1, 4 * steps))
    assert first["lr"] > 20 * 1e-3 * lr_factor("onecycle", steps - 1, 2000 * steps)


def test_budget_planner_waits_for_the_first_epoch_that_trains_the_backbone() -> None:
    """A finetune warm-up epoch trains only the head: its speed says nothing about the epochs after it."""
    # The planner reads the clock before steps 1-9: 1 s a step, but for one 30-s pause it must ignore.
    clock = iter([100.0, 101.0, 102.0, 133.0, 134.0, 135.0, 136.0, 137.0, 138.0])
    config = TrainConfig(data_dir="x", strategy="finetune", warmup_epochs=1, epochs=100, time_budget_s=100)
    first = get_strategy(config.strategy).first_representative_epoch(config)
    planner = BudgetPlanner(config.time_budget_s, config.epochs, first, steps_per_epoch=20, n_train=1000,
                            n_val=0, clock=lambda: next(clock))
    elapsed = 10.0  # the warm-up epoch took 10 s
    assert all(planner.early(0, step, elapsed, 100) is None for step in range(20))
    plans = [planner.early(1, step, elapsed, 100) for step in range(20)]
    # The median step took 1 s, 20 s per epoch; 10 + 20 s after epoch 2,
    # then 70 s left hold 3 more: 5 epochs.
    assert plans[:9] == [None] * 9 and plans[10:] == [None] * 10
    assert plans[9] == 5
    # The first full epoch measures better than 8 steps, either way; later epochs only shrink the plan.
    assert planner.after_epoch(1, 25.0, 5, 15.0) == 7  # 2 done, 75 s left: 5 more
    assert planner.after_epoch(2, 35.0, 7, 10.0) == 7  # 3 done, 65 s left would allow 9
    assert planner.after_epoch(2, 45.0, 7, 20.0) == 5  # 3 done, 55 s left: 2 more


def test_without_a_budget_the_plan_is_never_changed() -> None:
    planner = BudgetPlanner(None, 10, 0, steps_per_epoch=20, n_train=100, n_val=10, clock=lambda: 0.0)
    assert all(planner.early(0, step, 5.0, 10) is None for step in range(20))
    assert planner.after_epoch(0, 500.0, 10, 500.0) == 10


@pytest.mark.parametrize("elapsed,cost,expected", [(10.0, 20.0, 6), (0.0, 1e-9, 100), (150.0, 20.0, 2)])
def test_epochs_that_fit_never_exceed_the_cap_nor_undo_epochs_done(elapsed, cost, expected) -> None:
    assert epochs_that_fit(100.0, 2, elapsed, cost, at_most=100) == expected
