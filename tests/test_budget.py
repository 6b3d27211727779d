"""Time budgets, timed by an injected clock: the behaviour is the same on an idle or a busy machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_csv_dataset

from imgcls.config import TrainConfig
from imgcls.data.transforms import Preprocess
from imgcls.models import create_model
from imgcls.runtime import make_runtime
from imgcls.train import features as features_module
from imgcls.train import runner
from imgcls.train.budget import BudgetPlanner, Deadline, PacedStop, epochs_that_fit, paced_slices
from imgcls.train.features import FeatureCache, build_feature_cache, probe_head
from imgcls.train.optim import StepSchedule, lr_at, lr_factor
from imgcls.train.run_folder import RunFolder
from imgcls.train.strategies import get_strategy
from imgcls.train.validation import NOT_VALIDATED, beats, stratified_order

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
    # The budget holds 3 s / 0.04 s = 75 steps less the validations the planner expects (a third of
    # a step per validation image): 4 epochs of 16 steps and most of a 5th, where the plan stops it.
    taken = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert steps == 16 and info["epochs"] == 5 and 4 * steps < taken < 75
    assert info["train_seconds"] == pytest.approx(taken * STEP_S) and info["train_seconds"] <= 3.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The first epoch's last step already had the lr of the budget's schedule, over 10x that of a 2000-epoch
    # one (the new plan took the warm-up on from step 9), and the lr reached its end value at the step the
    # run ended on.
    assert records[0]["lr"] > 10 * 1e-3 * lr_factor("onecycle", steps - 1, 2000 * steps)
    assert records[-1]["stopped_at_step"] == taken - 4 * steps
    start, done = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["schedule_anchor"]
    last_progress = done + (taken - 1 - start) / (taken - start) * (1 - done)  # the plan ends where the run did
    assert records[-1]["lr"] == pytest.approx(1e-3 * lr_at("onecycle", last_progress))


def test_budget_planner_waits_for_the_first_epoch_that_trains_the_backbone() -> None:
    """A finetune warm-up epoch trains only the head: its speed says nothing about the epochs after it."""
    # The planner reads the clock before steps 1-9: 1 s a step, but for one 30-s pause it must ignore.
    clock = iter([100.0, 101.0, 102.0, 133.0, 134.0, 135.0, 136.0, 137.0, 138.0])
    config = TrainConfig(data_dir="x", strategy="finetune", warmup_epochs=1, epochs=100, time_budget_s=100)
    first = get_strategy(config.strategy).first_representative_epoch(config)
    planner = BudgetPlanner(config.time_budget_s, config.epochs, first, steps_per_epoch=20, n_train=1000,
                            n_val=0, clock=lambda: next(clock))
    elapsed = 10.0  # the warm-up epoch took 10 s
    assert all(planner.early(0, step, elapsed, 2000) is None for step in range(20))
    plans = [planner.early(1, step, elapsed, 2000) for step in range(20)]
    # The median step took 1 s: 29 steps done after 10 + 9 s, and 81 s left hold 81 more.
    assert plans[:9] == [None] * 9 and plans[10:] == [None] * 10
    assert plans[9] == 110
    # Every full epoch measures better than 8 steps and corrects the plan, either way.
    assert planner.after_epoch(1, 25.0, 110, 15.0) == 140  # 40 done, 75 s left at 0.75 s: 100 more
    assert planner.after_epoch(2, 35.0, 140, 10.0) == 190  # 60 done, 65 s left at 0.5 s: 130 more
    assert planner.after_epoch(2, 45.0, 190, 20.0) == 115  # 60 done, 55 s left at 1 s: 55 more


def test_a_new_plan_takes_the_schedule_on_from_where_it_stands_without_a_jump() -> None:
    """Grown at step 30 (past the peak) and shrunk at step 100, the lr still only falls after its
    peak, changes at each new plan by no more than a step of the shortest plan would, and anneals to
    its end value on the last step of the last plan."""
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "base_lr": 1.0}], lr=1.0)
    schedule = StepSchedule(optimizer, "onecycle", steps_per_epoch=10, epochs=10)
    lrs = []
    while schedule.step < schedule.total_steps:
        if schedule.step == 30:
            schedule.total_steps = 200
        if schedule.step == 100:
            schedule.total_steps = 120
        schedule()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert len(lrs) == 120
    peak = lrs.index(max(lrs))
    assert all(b <= a for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    biggest_step = max(abs(lr_factor("onecycle", i + 1, 120) - lr_factor("onecycle", i, 120)) for i in range(120))
    assert max(abs(lrs[i] - lrs[i - 1]) for i in (30, 100)) <= biggest_step
    assert lrs[-1] < 0.01


def test_a_slow_first_epoch_does_not_cut_the_run_short(csv_dataset: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine is 3x slower during the first epoch only: the plan sized on it grows again once
    the epochs run at full speed, and the run uses its budget (it stopped at 55% of it when later
    epochs could only shrink the plan)."""
    clock = StepClock()

    class SlowStart(StepSchedule):
        def __call__(self) -> None:
            super().__call__()
            clock.now += 3 * STEP_S if self.step <= 16 else STEP_S

    monkeypatch.setattr(runner, "StepSchedule", SlowStart)
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=2000,
                         time_budget_s=6.0, batch_size=2, precision="fp32", lr=1e-3)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=clock)
    assert info["status"] == "complete" and 0.9 * 6.0 <= info["train_seconds"] <= 6.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["lr"] < 0.01 * 1e-3  # annealed to its end where the budget ended


def test_without_a_budget_the_plan_is_never_changed() -> None:
    planner = BudgetPlanner(None, 10, 0, steps_per_epoch=20, n_train=100, n_val=10, clock=lambda: 0.0)
    assert all(planner.early(0, step, 5.0, 10) is None for step in range(20))
    assert planner.after_epoch(0, 500.0, 10, 500.0) == 10


@pytest.mark.parametrize("elapsed,cost,expected", [(10.0, 20.0, 6), (0.0, 1e-9, 100), (150.0, 20.0, 2)])
def test_epochs_that_fit_never_exceed_the_cap_nor_undo_epochs_done(elapsed, cost, expected) -> None:
    assert epochs_that_fit(100.0, 2, elapsed, cost, at_most=100) == expected


def test_a_budget_ends_the_run_inside_an_epoch_at_the_last_step_that_fits(csv_dataset: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan fits 4 epochs; in the 4th the machine gets 3x slower. The run stops at the last
    step that ends within the budget, validates that part epoch, and finishes as a complete run."""
    clock = StepClock()
    slow_from = 3 * 16 + 4  # the 5th step of epoch 4

    class SlowingSchedule(StepSchedule):
        def __call__(self) -> None:
            super().__call__()
            clock.now += STEP_S if self.step <= slow_from else 3 * STEP_S

    monkeypatch.setattr(runner, "StepSchedule", SlowingSchedule)
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=2000,
                         time_budget_s=3.0, batch_size=2, precision="fp32", lr=1e-3)
    lines: list[str] = []
    info = runner.fit(config, tmp_path / "run", log=lines.append, clock=clock)
    # 3 epochs (1.92 s) + 4 fast steps (0.16 s) leave 0.92 s: 7 slow steps of 0.12 s, not 8.
    assert info["epochs"] == 4 and info["status"] == "complete"
    assert info["train_seconds"] == pytest.approx(1.92 + 0.16 + 7 * 3 * STEP_S)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 4 and last["stopped_at_step"] == 4 + 7
    assert "the time budget ended it after 11 of 16 steps" in lines[-1]
    phases = info["budget"].pop("phases")
    assert info["budget"] == {"budget_s": 3.0, "seconds": pytest.approx(2.92), "counted_from": "the train call",
                              "cut_short": True, "cuts": ["epochs", "inside an epoch"], "over_s": 0.0,
                              "over_pct": 0.0}
    # The clock's time, phase by phase: here only the steps take any.
    assert sum(phases.values()) == pytest.approx(2.92) and phases["training"] == pytest.approx(2.92)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 4 and saved["step"] == 3 * 16 + 11 and saved["position"] is None


def test_time_outside_the_steps_counts_against_the_budget(csv_dataset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation is the budget's too (here it takes 10 s of an 8-s budget): no epoch starts after
    it, and run.json says by how much the run went over."""
    clock = StepClock()
    real_validate = runner.validate_paced

    def slow_validate(*args, **kwargs):
        clock.now += 10.0
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(runner, "validate_paced", slow_validate)
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=5,
                         time_budget_s=8.0, batch_size=2, precision="fp32", lr=1e-3)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=clock)
    assert info["epochs"] == 1 and info["train_seconds"] == pytest.approx(10.0)
    assert info["budget"]["cuts"] == ["epochs"] and info["budget"]["over_s"] == 2.0
    assert info["budget"]["over_pct"] == 25.0


def test_a_feature_pass_cut_by_its_deadline_keeps_a_seeded_random_sample_of_both_sets() -> None:
    """700 images in batches of 64 at 1/64 s an image, 2.5 s to spend: a first batch of 8 times the
    pace, two full batches follow, and the last is cut to the 24 images that still end in time.
    What it computed is the seed's sample of train and validation alike, the same features as an
    uncut pass gives those images, and a resume redoes exactly that sample."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=3).eval()
    images = torch.randint(0, 256, (700, 32, 32, 3), dtype=torch.uint8)
    targets = torch.arange(700) % 3
    is_val = torch.arange(700) % 7 == 0
    train_idx, val_idx = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    clock = StepClock()

    def timed(batch, *args, **kwargs):
        clock.now += len(batch) / 64
        return Preprocess((0.5,) * 3, (0.5,) * 3, 3)(batch, *args, **kwargs)

    kw = dict(preprocess=timed, runtime=make_runtime("cpu", "fp32", False, model=model), seed=4, clock=clock)
    cut = build_feature_cache(model, images, targets, train_idx, val_idx, deadline=Deadline(2.5, clock=clock), **kw)
    assert (cut.seeded_rows, cut.left_out) == (160, 540) and len(cut.train) + len(cut.val) == 160
    assert cut.seconds == 2.5
    both = torch.cat([train_idx, val_idx])
    picked = torch.randperm(700, generator=torch.Generator().manual_seed(4))[:160].sort()[0]
    picked_train, picked_val = both[picked[picked < len(train_idx)]], both[picked[picked >= len(train_idx)]]
    assert 0 < len(picked_val) < len(picked_train)  # both sets, in about their proportion (1:6)
    assert torch.equal(cut.train_targets, targets[picked_train]) and torch.equal(cut.val_targets, targets[picked_val])
    full = build_feature_cache(model, images, targets, train_idx, val_idx, **{**kw, "seed": 0})
    position = {int(i): n for n, i in enumerate(train_idx)}
    assert torch.allclose(cut.train, full.train[[position[int(i)] for i in picked_train]], atol=1e-5)
    again = build_feature_cache(model, images, targets, train_idx, val_idx, deadline=Deadline(None, clock=clock),
                                cut_at=160, **kw)
    assert torch.equal(again.train, cut.train) and torch.equal(again.val, cut.val) and again.left_out == 540


def test_a_deadline_sizes_the_head_probe_to_the_epochs_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe asked for 30 epochs with time for 3: its schedule anneals over 3, not 30."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=3)
    features = torch.randn(64, model.num_features)
    cache = FeatureCache(features, torch.arange(64) % 3, features[:8], torch.arange(8) % 3, 0.0)
    clock = StepClock()
    epoch_s = 1.0

    def timed_epoch(*args, **kwargs):
        clock.now += epoch_s
        return {**real_epoch(*args, **kwargs), "seconds": epoch_s}

    real_epoch = features_module.train_head_epoch
    monkeypatch.setattr(features_module, "train_head_epoch", timed_epoch)
    result = probe_head(model, cache, epochs=30, lr=1e-2, weight_decay=0.0, batch_size=16, seed=0,
                        runtime=make_runtime("cpu", "fp32", False, model=model), deadline=Deadline(3.5, clock=clock))
    assert result["epochs"] == 3 and clock.now - 1000.0 == 3.0


def test_the_head_strategy_trains_on_the_features_its_budget_held(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """300 images at 1/64 s each take 4.7 s; the feature pass's 90% of a 1.5-s budget holds a first
    batch of 8, one of 64 and one cut to the 14 images that still fit. The run says so in one line,
    trains the head on that sample and records the cut."""
    data = make_csv_dataset(tmp_path / "ds", n_per_class=100) / "train"
    torch.manual_seed(7)
    weights = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("test_efficientnet", 1000).net.state_dict().items()},
              str(weights))
    clock = StepClock()
    real_build = runner.build_feature_cache

    def timed_build(*args, preprocess, **kwargs):
        def timed(batch, *a, **k):
            clock.now += len(batch) / 64
            return preprocess(batch, *a, **k)
        return real_build(*args, preprocess=timed, **kwargs)

    monkeypatch.setattr(runner, "build_feature_cache", timed_build)
    config = TrainConfig(data_dir=str(data), model="test_efficientnet", weights=str(weights), strategy="head",
                         image_size=32, epochs=3, batch_size=8, time_budget_s=1.5, precision="fp32",
                         channels_last=False)
    lines: list[str] = []
    info = runner.fit(config, tmp_path / "run", log=lines.append, clock=clock)
    assert [line for line in lines if line.startswith("time budget:")] == [
        f"time budget: backbone features of only 86 of 300 images fit (1.3s); the head trains on a random "
        f"{info['feature_cache']['train_images']} of {info['data']['train']} training images and validates "
        f"on {info['feature_cache']['val_images']} of {info['data']['val']}"]
    assert info["feature_cache"]["train_images"] + info["feature_cache"]["val_images"] == 86
    assert info["epochs"] == 3 and info["budget"]["cuts"] == ["features"] and info["budget"]["over_s"] == 0.0


def test_compare_says_how_each_cell_went_against_its_budget(tmp_path: Path) -> None:
    from imgcls.compare import budget_note

    record = {"budget_s": 20.0, "seconds": 23.0, "cut_short": True, "cuts": ["features", "epochs"],
              "over_s": 3.0, "over_pct": 15.0}
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete", "budget": record}))
    # A run from before the budget clock counted the whole call.
    assert budget_note(tmp_path) == " (training 23s of a 20s budget, 3.0s (15%) over; cut: features, epochs)"
    record.update(counted_from="the train call", phases={"preflight": 2.0, "data": 6.0, "features": 12.0,
                                                         "training": 3.0})
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete", "budget": record}))
    assert budget_note(tmp_path) == (" (the cell 23s of a 20s budget, 3.0s (15%) over; cut: features, epochs; "
                                     "most of it: features 12s, data 6s, training 3s)")
    (tmp_path / "run.json").write_text(json.dumps({"status": "complete"}))  # a run from before budgets were kept
    assert budget_note(tmp_path) == ""


def test_a_budget_spent_before_training_still_ends_with_a_model(csv_dataset: Path, tmp_path: Path,
                                                                step_clock: StepClock,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The data load took the whole budget (a busy machine): one step trains, so the run has a
    model to predict with, and run.json says how far over the budget it ended."""
    real_prepare = runner.prepare

    def slow_prepare(*args, **kwargs):
        step_clock.now += 5.0
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(runner, "prepare", slow_prepare)
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=10,
                         time_budget_s=4.0, batch_size=2, precision="fp32", lr=1e-3)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=step_clock)
    assert info["epochs"] == 1 and (tmp_path / "run" / "model.safetensors").exists()
    assert RunFolder(tmp_path / "run").read_metrics()[-1]["stopped_at_step"] == 1
    assert info["budget"]["over_s"] == pytest.approx(1.0 + STEP_S) and info["budget"]["over_pct"] == 26.0


def test_a_paced_pass_cuts_its_batches_to_what_ends_in_time() -> None:
    """Items cost 1 s each and 20.5 s are left: the pass times its pace on its smallest batch, then
    runs full batches, then the one that still fits, and starts nothing that would end late."""
    clock = StepClock()
    pace = PacedStop(Deadline(20.5, clock=clock))
    sizes = []
    for part in paced_slices(100, 8, pace, least=2):
        sizes.append(part.stop - part.start)
        clock.now += 1.0 * sizes[-1]
    assert sizes == [2, 8, 8, 2] and clock.now - 1000.0 == 20.0


def test_a_paced_pass_always_does_its_first_batch() -> None:
    """The deadline is past before the pass starts: its smallest batch still runs, and nothing after it."""
    clock = StepClock()
    pace = PacedStop(Deadline(1.0, clock=clock))
    clock.now += 5.0
    assert [(p.start, p.stop) for p in paced_slices(100, 8, pace, least=3)] == [(0, 3)]


def test_the_stratified_validation_order_keeps_every_prefix_in_class_proportion() -> None:
    targets = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    order = stratified_order(targets, seed=5)
    assert sorted(order.tolist()) == list(range(100))
    for k in range(1, 101):
        counts = torch.bincount(targets[order[:k]], minlength=3).float()
        assert torch.all((counts - k * torch.tensor([0.6, 0.3, 0.1])).abs() <= 1.0), k
    assert torch.equal(order, stratified_order(targets, seed=5))
    assert not torch.equal(order, stratified_order(targets, seed=6))


def test_the_best_model_is_chosen_on_the_images_both_validations_saw() -> None:
    """A pass cut to 2 images scores 0.5 there; the best so far, validated on all 10, scores 0.2 in
    all but 1.0 on those 2: it stays the best. On the same images the better one wins."""
    best = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int8)
    cut = torch.full((10,), NOT_VALIDATED, dtype=torch.int8)
    cut[:2] = torch.tensor([1, 0])
    assert not beats(cut, 0.5, best, 0.2)
    cut[:2] = 1
    assert not beats(cut, 1.0, best, 0.2)  # a tie on the shared images keeps the earlier model
    assert beats(best, 0.2, torch.zeros(10, dtype=torch.int8), 0.0)
    disjoint = torch.full((10,), NOT_VALIDATED, dtype=torch.int8)
    disjoint[5:] = 1
    only_first = torch.full((10,), NOT_VALIDATED, dtype=torch.int8)
    only_first[:5] = 0
    assert beats(disjoint, 1.0, only_first, 0.0)  # nothing shared: the accuracies decide
    assert beats(None, 0.3, None, 0.2) and not beats(None, 0.1, None, 0.2)
    assert beats(best.clone(), 0.2, best, 0.2) and beats(None, 0.2, None, 0.2)  # a full tie: the later model
    assert beats(cut, float("nan"), best, 0.2)  # no validation images: the latest model is kept


def test_a_validation_the_budget_cannot_pay_for_is_cut_to_a_stratified_subset(tmp_path: Path,
                                                                               step_clock: StepClock,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """60 validation images at 0.05 s each cost 3 s; after 15 steps (0.6 s) of a 2.03-s budget the pass
    validates on what the 1.43 s left holds: a first batch of 8 images that times the pace, then 20.
    The run ends within its budget and says which epoch was validated on a subset."""
    data = make_csv_dataset(tmp_path / "ds", n_per_class=40) / "train"
    real_validate = runner.validate_paced

    def timed_validate(*args, preprocess, **kwargs):
        def timed(batch, *a, **k):
            step_clock.now += 0.05 * len(batch)
            return preprocess(batch, *a, **k)
        return real_validate(*args, preprocess=timed, **kwargs)

    monkeypatch.setattr(runner, "validate_paced", timed_validate)
    config = TrainConfig(data_dir=str(data), model="scratch-cnn-tiny", epochs=1, time_budget_s=2.03, batch_size=4,
                         precision="fp32", lr=1e-3, val_fraction=0.5)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=step_clock)
    assert info["data"]["val"] == 60 and info["epochs"] == 1
    assert RunFolder(tmp_path / "run").read_metrics()[-1]["val_images"] == 28
    assert info["train_seconds"] == pytest.approx(0.6 + 28 * 0.05) and info["budget"]["over_s"] == 0.0
    assert info["budget"]["cuts"] == ["validation"] and info["budget"]["validated_on_a_subset"] == [1]
    assert info["budget"]["phases"]["validation"] == pytest.approx(1.4)
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_budget_counts_the_wait_before_the_train_call(csv_dataset: Path, tmp_path: Path,
                                                          step_clock: StepClock) -> None:
    """The CLI passes its process's start: 2.5 s of a 3-s budget went to the imports, so the run
    trains what the 0.5 s left holds and run.json counts all 3 s from the command's start."""
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", epochs=50,
                         time_budget_s=3.0, batch_size=2, precision="fp32", lr=1e-3)
    info = runner.fit(config, tmp_path / "run", log=lambda _: None, clock=step_clock, started=step_clock.now - 2.5)
    budget = info["budget"]
    assert budget["counted_from"] == "the command's start" and budget["phases"]["startup"] == 2.5
    assert budget["seconds"] == pytest.approx(2.5 + 12 * STEP_S) and budget["over_s"] == 0.0
    assert RunFolder(tmp_path / "run").read_metrics()[-1]["stopped_at_step"] == 12
