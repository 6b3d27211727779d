"""The weight average: its arithmetic, and that validation, the best model and resume use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import make_csv_dataset
from imgcls.config import TrainConfig
from imgcls.errors import OptionError
from imgcls.train.ema import WeightEMA, make_ema
from imgcls.train.runner import fit


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_average_equals_a_hand_computed_ema_after_a_few_steps() -> None:
    model, decay = tiny_model(), 0.9
    ema = WeightEMA(model, decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    expected = None
    for n in range(25):  # past the warm-up (n / (10 + n) < 0.9 up to n = 90): both regimes checked below
        loss = model(torch.randn(8, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        d = min(decay, n / (10 + n))
        expected = weights if expected is None else {
            k: (d * expected[k] + (1 - d) * w if w.is_floating_point() else w) for k, w in weights.items()}
    averaged = ema.module.state_dict()
    for key, value in expected.items():
        assert torch.allclose(averaged[key], value, atol=1e-6), key
    # The average really lags the weights: it is not a copy of them.
    assert not torch.allclose(averaged["0.weight"], model.state_dict()["0.weight"])
    assert averaged["1.num_batches_tracked"] == 25 and ema.updates == 25


def test_long_run_decay_is_capped_at_the_requested_one() -> None:
    ema = WeightEMA(tiny_model(), 0.5)
    ema.updates = 1_000
    assert ema.current_decay() == 0.5


def test_zero_is_off_and_a_decay_outside_zero_one_is_an_option_error() -> None:
    assert make_ema(tiny_model(), 0.0) is None
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(OptionError, match="--ema-decay"):
            make_ema(tiny_model(), bad)


def config_for(data: Path, ema_decay: float, epochs: int = 3) -> TrainConfig:
    return TrainConfig(data_dir=str(data), model="scratch-cnn-tiny", epochs=epochs, batch_size=8,
                       precision="fp32", channels_last=False, seed=3, ema_decay=ema_decay)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv_dataset(tmp_path_factory.mktemp("ema") / "ds", n_per_class=16) / "train"


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema-ref") / "run"
    fit(config_for(data, 0.9), out, device="cpu", log=lambda _: None)
    return out


def test_the_best_model_is_the_average_and_run_json_records_the_decay(reference: Path) -> None:
    run = json.loads((reference / "run.json").read_text())
    assert run["ema_decay"] == 0.9
    saved = torch.load(reference / "checkpoint.pt", weights_only=True)
    best = load_file(str(reference / "model.safetensors"))
    if run["best_epoch"] == run["epochs"]:  # the last epoch's average is the checkpoint's
        assert all(torch.equal(best[k], saved["ema"]["weights"][k]) for k in best)
    # The kept model is an average, not the training weights.
    assert any(not torch.equal(best[k], saved["model"][k]) for k in best if best[k].is_floating_point())


def test_resume_with_ema_on_equals_the_uninterrupted_run(data: Path, reference: Path, tmp_path: Path) -> None:
    out, stopped = tmp_path / "run", []

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/") and not stopped:  # logged once epoch 1 is saved
            stopped.append(line)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config_for(data, 0.9), out, device="cpu", log=stop_after_first_epoch)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    fit(config_for(data, 0.9), out, device="cpu", log=lambda _: None)
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(reference / "checkpoint.pt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] > 0
    for part in ("model", "ema"):
        weights_a = a[part] if part == "model" else a[part]["weights"]
        weights_b = b[part] if part == "model" else b[part]["weights"]
        assert all(torch.allclose(weights_a[k].double(), weights_b[k].double(), atol=1e-6) for k in weights_b)
    best_a, best_b = load_file(str(out / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.allclose(best_a[k].double(), best_b[k].double(), atol=1e-6) for k in best_b)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_acc"] for m in metrics] == [m["val_acc"] for m in expected]


def test_the_recipe_decides_when_the_option_is_unset() -> None:
    from imgcls.train.runner import resolved_ema_decay

    recipe = TrainConfig(data_dir="d", model="scratch-cnn-ema")
    assert resolved_ema_decay(recipe) == 0.99
    assert resolved_ema_decay(recipe.replace(ema_decay=0.0)) == 0.0  # an explicit 0 turns it off
    assert resolved_ema_decay(TrainConfig(data_dir="d", model="scratch-cnn")) == 0.0
