"""Automatic sizing: enough optimizer steps on little data, today's settings on plenty."""

from __future__ import annotations

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
