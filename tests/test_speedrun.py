"""The 5-minute recipe: a budget planned in optimizer steps, the frozen whitening layer, and the
scratch-speedrun model trained, resumed and exported like any other."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_resume import checkpoints_equal, ctrl_c_raises, signal_at_step  # noqa: F401 (a fixture)

from imgcls.config import TrainConfig
from imgcls.export import export_onnx
from imgcls.models import create_model
from imgcls.models.registry import _REGISTRY
from imgcls.models.scratch import SPEEDRUN, PatchWhitening, _builder
from imgcls.predict import OnnxPredictor, Predictor
from imgcls.train.budget import BudgetPlanner, steps_that_fit
from imgcls.errors import RunFolderError
from imgcls.train.runner import fit


@pytest.mark.parametrize("done,elapsed,expected", [
    (0, 0.0, 95),     # 100 s: 9 epochs of 10 steps and their validations (10.5 s each), then 5 steps + 1 s
    (20, 21.0, 95),   # 2 epochs done in 21 s: 79 s left, 7 more epochs (73.5 s) and 5 steps
    (0, 99.0, 0),     # not even one step and a validation fit
    (95, 99.5, 95),   # never fewer than done
])
def test_steps_that_fit_count_a_validation_for_every_epoch_they_end(done, elapsed, expected) -> None:
    assert steps_that_fit(100.0, done, elapsed, step_s=1.0, validation_s=0.5, steps_per_epoch=10,
                          at_most=1000) == expected


def test_steps_that_fit_never_exceed_the_cap() -> None:
    assert steps_that_fit(100.0, 0, 0.0, step_s=0.01, validation_s=0.0, steps_per_epoch=10, at_most=30) == 30
    assert steps_that_fit(float("inf"), 0, 0.0, 1.0, 0.0, 10, at_most=30) == 30


def test_the_planner_plans_steps_from_the_early_estimate_and_each_epoch() -> None:
    """1 s a step on the injected clock, 20 steps an epoch, no validation: a 100-s budget after
    10 s of loading holds 90 steps, 4.5 epochs; each epoch corrects it, either way."""
    clock = iter(float(t) for t in range(100, 110))
    planner = BudgetPlanner(100.0, 100, 0, steps_per_epoch=20, n_train=1000, n_val=0, clock=lambda: next(clock))
    plans = [planner.early(0, step, 10.0, 2000) for step in range(20)]
    assert plans[9] == 90 and plans[:9] == [None] * 9 and plans[10:] == [None] * 10
    assert planner.after_epoch(0, 25.0, 90, 15.0) == 120  # 0.75 s a step: 75 s hold 100 more
    assert planner.after_epoch(1, 35.0, 120, 15.0) == 126  # 65 s left at 0.75 s: 40 done + 86
    assert planner.after_epoch(2, 70.0, 126, 30.0) == 80  # 1.5 s a step: 30 s hold 20 more


def test_epochs_that_cannot_stop_inside_are_planned_in_whole_epochs() -> None:
    planner = BudgetPlanner(100.0, 100, 0, steps_per_epoch=20, n_train=1000, n_val=0, clock=lambda: 0.0,
                            whole_epochs=True)
    assert planner.after_epoch(0, 30.0, 90, 15.0) == 100  # 113 steps fit: 5 whole epochs
    assert planner.after_epoch(1, 99.0, 100, 15.0) == 40  # 41 fit: the epochs done


def test_whitening_gives_the_patches_unit_covariance() -> None:
    """Correlated pixels in, decorrelated unit-variance directions out (the + half of the filters)."""
    torch.manual_seed(0)
    images = F.avg_pool2d(torch.randn(64, 1, 33, 33), 2, stride=1)[:, :, :32, :32] * 3 + 1  # neighbours correlate
    layer = PatchWhitening(1, size=2, eps=0.0)
    layer.fit(images)
    out = layer(images)[:, :4, :-1, :-1]  # the padded last row and column are not whole patches
    flat = out.permute(0, 2, 3, 1).reshape(-1, 4)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(4), atol=1e-3)
    assert torch.equal(layer.weight[4:], -layer.weight[:4])


@pytest.fixture(scope="module")
def speedrun_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_csv_dataset

    return make_csv_dataset(tmp_path_factory.mktemp("speedrun") / "ds", n_per_class=16, n_test=30)


def speedrun_config(data: Path) -> TrainConfig:
    return TrainConfig(data_dir=str(data / "train"), model="scratch-speedrun", epochs=3, batch_size=2,
                       precision="fp32", channels_last=False, augment="flip-shift", lr=2e-3, seed=5)


def test_the_recipe_is_recorded_and_the_whitening_layer_is_fitted_and_frozen(speedrun_data: Path,
                                                                          tmp_path: Path) -> None:
    info = fit(speedrun_config(speedrun_data), tmp_path / "run", log=lambda _: None)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["recipe"] == json.loads(json.dumps(SPEEDRUN)) and set(SPEEDRUN) >= {"widths", "whiten"}
    assert recorded["model"]["kwargs"] == recorded["recipe"]  # the network's shape, with the model
    assert recorded["ema_decay"] == 0.99 and info["recipe"]["whiten"] == 2
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    whitening = saved["model"]["whiten.weight"]
    assert whitening.abs().sum() > 0 and torch.equal(saved["ema"]["weights"]["whiten.weight"], whitening)
    # Fitted before training and never trained: the filters are those of the seeded sample.
    model = create_model("scratch-speedrun", num_classes=3, in_chans=1)
    assert not any(name.startswith("whiten") for name, _ in model.named_parameters())


def test_a_stopped_speedrun_run_resumes_to_the_same_bits(speedrun_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, ctrl_c_raises) -> None:
    config = speedrun_config(speedrun_data)
    fit(config, tmp_path / "reference", log=lambda _: None)
    signal_at_step(monkeypatch, signal.SIGINT, 25)
    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run", log=lambda _: None)
    monkeypatch.undo()
    fit(config, tmp_path / "run", log=lambda _: None)
    checkpoints_equal(tmp_path / "run", tmp_path / "reference")
    a, b = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["ema"] for name in ("run", "reference"))
    assert a["updates"] == b["updates"] and all(torch.equal(a["weights"][k], b["weights"][k]) for k in b["weights"])


def test_the_whitening_layer_exports_to_onnx_and_loads_back(speedrun_data: Path, tmp_path: Path) -> None:
    fit(speedrun_config(speedrun_data), tmp_path / "run", log=lambda _: None)
    eager = Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32")
    images = eager.load(speedrun_data / "test").images
    exported = OnnxPredictor.from_export(export_onnx(tmp_path / "run")["path"])
    p_eager, p_onnx = eager.predict_proba(images), exported.predict_proba(images)
    assert np.abs(p_eager - p_onnx).max() < 1e-5
    assert (eager.predict(images) == exported.predict(images)).all()
    assert len(set(p_eager.argmax(1).tolist())) > 1  # not agreement on a constant


def test_a_run_folder_rebuilds_the_network_it_recorded_after_the_recipe_changes(
        speedrun_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later version's scratch-speedrun may have another shape: a run folder keeps its own, and
    one written before the model record carried the shape rebuilds it from run.json's recipe."""
    fit(speedrun_config(speedrun_data), tmp_path / "run", log=lambda _: None)
    images = Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32").load(speedrun_data / "test").images
    before = Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32").predict_proba(images)
    spec = _REGISTRY["scratch-speedrun"]
    other = {**SPEEDRUN, "widths": (8, 16, 24)}
    monkeypatch.setitem(_REGISTRY, "scratch-speedrun", type(spec)(**{**spec.__dict__, "builder": _builder(**other),
                                                                      "extra": {**spec.extra, "recipe": other}}))
    assert create_model("scratch-speedrun", num_classes=3, in_chans=1).stages[0][0][0].out_channels == 8
    after = Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32").predict_proba(images)
    np.testing.assert_array_equal(after, before)
    run_json = tmp_path / "run" / "run.json"
    legacy = json.loads(run_json.read_text())
    del legacy["model"]["kwargs"]  # as main wrote it before: the shape only in "recipe"
    run_json.write_text(json.dumps(legacy))
    np.testing.assert_array_equal(Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32")
                                  .predict_proba(images), before)
    legacy["recipe"] = [1, 2]
    run_json.write_text(json.dumps(legacy))
    with pytest.raises(RunFolderError, match=r"run\.json: the model's shape is a list, not a mapping"):
        Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32")
