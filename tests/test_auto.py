"""Automatic sizing: enough optimizer steps on little data, today's settings on plenty."""

from __future__ import annotations

import json
import math

import pytest

from imgcls.train.auto import (MAX_EPOCHS, MIN_STEPS, MIN_STEPS_PER_EPOCH, MIN_VAL_PER_CLASS, auto_batch_size,
                               auto_epochs, loss_warning, validation_per_class)


@pytest.mark.parametrize("n_train", [100, 270, 300, 1_000, 3_000, 10_000, 54_000])
def test_every_size_gets_enough_steps(n_train: int) -> None:
    batch = auto_batch_size(n_train)
    epochs = auto_epochs(n_train, batch)
    steps_per_epoch = n_train // batch
    assert 16 <= batch <= 128 and batch & (batch - 1) == 0
    if n_train >= 16 * MIN_STEPS_PER_EPOCH:
        assert steps_per_epoch >= MIN_STEPS_PER_EPOCH
    assert steps_per_epoch * epochs >= MIN_STEPS or epochs == MAX_EPOCHS


def test_plenty_of_data_keeps_the_measured_full_size_recipe() -> None:
    assert auto_batch_size(54_000) == 128 and auto_epochs(54_000, 128) == 10


def test_the_300_image_case_no_longer_takes_20_steps() -> None:
    batch = auto_batch_size(300)
    assert batch == 16 and (300 // batch) * auto_epochs(300, batch) >= MIN_STEPS


def test_validation_for_a_subset_is_its_share_but_never_tiny() -> None:
    assert validation_per_class(30, 0.1) == MIN_VAL_PER_CLASS
    assert validation_per_class(1_000, 0.1) == math.ceil(1_000 * 0.1 / 0.9)


def test_loss_above_chance_is_reported() -> None:
    assert loss_warning(2.0, 10) is None
    line = loss_warning(3.77, 10)
    assert "above chance" in line and "2.303" in line and "\n" not in line
    assert "above chance" in loss_warning(float("nan"), 3)


def test_a_run_left_to_auto_records_the_resolved_sizes_and_validates_on_the_subset(tmp_path) -> None:
    from conftest import make_csv_dataset
    from imgcls.config import TrainConfig
    from imgcls.train.runner import fit

    data = make_csv_dataset(tmp_path / "ds", n_per_class=60) / "train"  # 3 classes
    config = TrainConfig(data_dir=str(data), model="scratch-cnn-tiny", per_class=4, val_fraction=0.5,
                         epochs=1, precision="fp32")
    run = fit(config, tmp_path / "run", device="cpu", log=lambda _: None)
    assert run["resolved"]["batch_size"] == auto_batch_size(12) == 16 and run["resolved"]["epochs"] == 1
    assert run["data"]["train"] == 12
    assert run["data"]["val"] == 3 * MIN_VAL_PER_CLASS  # not the pool's 90 held-out images
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["batch_size"] is None  # the request; run.json holds what it became
    assert run["config_hash"] == config.hash()


def test_resolve_keeps_explicit_values_and_sizes_the_rest() -> None:
    from imgcls.config import TrainConfig
    from imgcls.train.auto import resolve_sizes

    explicit = TrainConfig(data_dir="d", batch_size=128, epochs=10)
    assert resolve_sizes(explicit, 300) == explicit
    auto = resolve_sizes(TrainConfig(data_dir="d"), 300)
    assert (auto.batch_size, auto.epochs) == (16, auto_epochs(300, 16))
    assert resolve_sizes(TrainConfig(data_dir="d", batch_size=32), 300).epochs == auto_epochs(300, 32)


def test_the_warning_is_one_line_and_spares_the_first_epoch() -> None:
    from imgcls.train.runner import _warn_if_above_chance

    lines: list[str] = []
    assert not _warn_if_above_chance({"epoch": 1, "train_loss": 2.5}, 10, lines.append)
    assert not _warn_if_above_chance({"epoch": 2, "train_loss": 2.0}, 10, lines.append)
    assert _warn_if_above_chance({"epoch": 3, "train_loss": 3.77}, 10, lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: epoch 3: training loss 3.770 is above chance")
