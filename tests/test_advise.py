"""The advisor: measured ImageNet similarity picks the right scenario; --strategy auto records it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from conftest import make_csv_dataset
from imgcls import advise as advise_module
from imgcls.advise import SCENARIOS, Advice, advise, required_margin
from imgcls.config import TrainConfig
from imgcls.train.runner import fit

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "immunohistochemistry")


def make_photo_crops(root: Path, n_per_class: int = 30, side: int = 48, seed: int = 0) -> Path:
    """ImageNet-like classes: random grey crops of scikit-image's sample photos, with brightness jitter and flips.

    Grey and jittered so that colour or mean brightness alone cannot tell the classes apart.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skdata, name)())
        h, w = photo.height, photo.width
        for i in range(n_per_class):
            s = rng.uniform(0.6, 1.0) * min(h, w)
            y, x = rng.uniform(0, h - s), rng.uniform(0, w - s)
            crop = photo.crop((int(x), int(y), int(x + s), int(y + s))).convert("L").resize((side, side))
            pixels = np.asarray(crop, np.float32) * rng.uniform(0.6, 1.2) + rng.uniform(-30, 30)
            pixels = pixels[:, ::-1] if rng.random() < 0.5 else pixels
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{name}{i}.png")
            rows.append((f"{name}{i}", name))
    with open(root / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows(rows)
    return root


def test_natural_photo_crops_are_scenario_1_head(tmp_path: Path) -> None:
    # Few labels per class: where ImageNet features shine and a CNN from scratch cannot catch up.
    advice = advise(make_photo_crops(tmp_path / "photos"), probe_per_class=2, holdout_per_class=10,
                    max_scratch_s=60, log=lambda _: None)
    assert (advice.classes, advice.per_class_min, advice.channels, advice.probe_holdout) == (8, 30, 1, 80)
    assert not advice.large
    assert advice.feature_acc - advice.scratch_acc >= advice.margin
    assert (advice.scenario, advice.strategy) == (1, "head")
    assert "--strategy head --pretrained" in advice.command and "--model efficientnet_lite0" in advice.command


def test_grey_glyphs_are_scenario_2_partial(tmp_path: Path) -> None:
    train = make_csv_dataset(tmp_path / "glyphs", n_per_class=30) / "train"
    # No time cap: the scratch trial's length in steps, not the machine's speed, decides its accuracy.
    advice = advise(train, probe_per_class=20, holdout_per_class=10, max_scratch_s=math.inf, log=lambda _: None)
    assert advice.image_size == (16, 16) and not advice.large
    # A scratch CNN learns glyphs as well as frozen ImageNet features do: no measurable advantage.
    assert advice.scratch_acc >= 0.8
    assert not advice.similar and (advice.scenario, advice.strategy) == (2, "partial")
    summary = advice.summary()
    assert "scenario 2" in summary and f"{advice.scratch_acc:.1%}" in summary


def test_scenario_table_and_noise_margin() -> None:
    assert {v for v in SCENARIOS.values()} == {(1, "head"), (2, "partial"), (3, "scratch"), (4, "finetune")}
    assert SCENARIOS[(True, False)] == (3, "scratch") and SCENARIOS[(True, True)] == (4, "finetune")
    # One miss in 30 held-out images is noise, not evidence; the same gap on 5,000 images is.
    assert required_margin(1.0, 29 / 30, 30) > 1 / 30
    assert required_margin(0.9, 0.85, 5000) == pytest.approx(0.02)


def _canned(train_dir: str, strategy: str) -> Advice:
    scenario = {"head": 1, "partial": 2, "scratch": 3, "finetune": 4}[strategy]
    return Advice(train_dir, 36, 3, 12, 12.0, (16, 16), 1, 24, 12, 0.5, 0.9, 1.0, 1.0, 30, 0.4, 0.2,
                  scenario > 2, scenario in (1, 4), scenario, strategy, "scratch-cnn", "imgcls train ...", 2.0)


def test_strategy_auto_records_the_decision_and_reuses_it_on_resume(csv_dataset: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_advise(train_dir, **kwargs):
        calls.append(train_dir)
        return _canned(str(train_dir), "scratch")

    monkeypatch.setattr(advise_module, "advise", fake_advise)
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="scratch-cnn-tiny", strategy="auto",
                         epochs=1, batch_size=16)
    out = tmp_path / "run"
    fit(config, out, log=lambda _: None)
    saved = json.loads((out / "config.json").read_text())
    assert saved["strategy"] == "scratch" and saved["pretrained"] is False
    assert saved["extra"]["strategy_requested"] == "auto"
    assert saved["extra"]["advice"]["scenario"] == 3 and saved["extra"]["advice"]["scratch_acc"] == 0.9
    fit(config, out, log=lambda _: None)  # complete run: the recorded decision is reused, not re-measured
    assert len(calls) == 1
