"""The learning-rate range test: suggests a rate inside the falling stretch and leaves the model as it was."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_csv_dataset
from imgcls.data import load_dataset
from imgcls.data.batches import iterate_batches
from imgcls.data.transforms import Preprocess
from imgcls.models import create_model
from imgcls.runtime import make_runtime
from imgcls.train.lr_find import lr_range_test, lr_schedule, valley
from imgcls.train.optim import build_optimizer


def test_valley_suggests_a_rate_where_the_loss_keeps_falling() -> None:
    lrs = lr_schedule(1e-6, 1.0, 61)  # ten steps a decade
    log = np.log10(lrs)
    # Flat until 1e-4, falling until 1e-2, then exploding.
    losses = np.where(log < -4, 2.3, np.where(log < -2, 2.3 - 0.8 * (log + 4), 0.7 + 5 * (log + 2) ** 2))
    losses = losses + np.random.default_rng(0).normal(0, 0.01, len(lrs))
    suggestion = valley(lrs, list(losses))
    assert 1e-4 < suggestion < 1e-2


def test_range_test_restores_the_model_and_stops_when_the_loss_diverges(tmp_path: Path) -> None:
    data = load_dataset(make_csv_dataset(tmp_path / "ds", n_per_class=20) / "train")
    torch.manual_seed(0)
    model = create_model("scratch-cnn-tiny", num_classes=3, in_chans=1)
    runtime = make_runtime("cpu", "fp32", channels_last=False)
    optimizer = build_optimizer([{"name": "all", "params": list(model.parameters()), "lr": 1e-3}], 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = itertools.cycle(list(iterate_batches(data.images, data.targets, 16)))
    finding = lr_range_test(model, batches, optimizer=optimizer, preprocess=Preprocess((0.5,), (0.5,), 1),
                            runtime=runtime, generator=torch.Generator().manual_seed(0),
                            start_lr=1e-5, end_lr=1e4, steps=90)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # fresh AdamW state again: the test's moments are gone
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3] * len(optimizer.param_groups)
    assert 10 < len(finding.lrs) < 90  # it stopped once the loss blew up, long before 1e4
    assert finding.losses[-1] > 4 * min(finding.losses) or not np.isfinite(finding.losses[-1])
    assert finding.lrs[0] <= finding.suggestion < finding.lrs[-1]


def test_lr_find_prints_the_curve_and_lr_auto_trains_at_its_suggestion(tmp_path: Path, capsys) -> None:
    import json

    from imgcls.cli import main

    data = make_csv_dataset(tmp_path / "ds", n_per_class=20) / "train"
    fast = ["--model", "scratch-cnn-tiny", "--precision", "fp32", "--device", "cpu"]
    assert main(["lr-find", str(data), "--json", str(tmp_path / "lr.json"), *fast]) == 0
    printed = capsys.readouterr().out
    finding = json.loads((tmp_path / "lr.json").read_text())
    assert "<- suggestion" in printed and f"suggested learning rate {finding['suggestion']:.3g}" in printed
    assert len(finding["lrs"]) == len(finding["losses"]) == finding["steps"] > 10
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--lr", "auto", "--epochs", "1", *fast]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["resolved"]["lr"] == run["lr_find"]["suggestion"]
    assert run["lr_find"]["suggestion"] == pytest.approx(finding["suggestion"])  # seeded: the same test
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == "auto"
