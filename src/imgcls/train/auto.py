"""Choices sized to the data: batch size, epochs and validation size when left to auto, and a warning
when training goes wrong. A fixed batch of 128 and 10 epochs suit 60,000 images; on 300 images they
are 2 optimizer steps an epoch, 20 in all, and the model barely leaves its random start."""

from __future__ import annotations

import math

from imgcls.config import TrainConfig

# Every epoch takes at least this many optimizer steps, and a run at least MIN_STEPS in all.
MIN_STEPS_PER_EPOCH = 16
MIN_STEPS = 600
BATCH_RANGE = (16, 128)  # below 16, BatchNorm statistics of a batch get noisy
MIN_EPOCHS, MAX_EPOCHS = 10, 100
# Validation images per class when the training set is a --per-class subset: enough to rank epochs
# (20 images a class put a 10-class accuracy within about +-3 points), far fewer than the whole pool.
MIN_VAL_PER_CLASS = 20


def auto_batch_size(n_train: int) -> int:
    """The largest power of two up to 128 that still gives MIN_STEPS_PER_EPOCH steps an epoch."""
    low, high = BATCH_RANGE
    fits = max(n_train // MIN_STEPS_PER_EPOCH, 1)
    return max(low, min(high, 2 ** int(math.log2(fits))))


def auto_epochs(n_train: int, batch_size: int) -> int:
    """Enough epochs for MIN_STEPS optimizer steps, between MIN_EPOCHS and MAX_EPOCHS."""
    steps_per_epoch = max(n_train // batch_size, 1)
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))


def validation_per_class(per_class: int, val_fraction: float) -> int:
    """Validation images per class for a `per_class` training subset: its share, but at least
    MIN_VAL_PER_CLASS (validating 300 training images on 6,000 costs 7x the training itself)."""
    share = math.ceil(per_class * val_fraction / max(1 - val_fraction, 1e-9))
    return max(share, MIN_VAL_PER_CLASS)


def loss_warning(train_loss: float, num_classes: int) -> str | None:
    """A line when the training loss is above what predicting every class equally gives (ln C)."""
    chance = math.log(num_classes)
    if math.isfinite(train_loss) and train_loss <= chance:
        return None
    return (f"training loss {train_loss:.3f} is above chance (ln {num_classes} = {chance:.3f}): "
            f"the learning rate is probably too high; try a lower --lr or --lr auto")


def resolve_sizes(config: TrainConfig, n_train: int) -> TrainConfig:
    """The config with batch size and epochs left to auto (None) sized to `n_train` images."""
    batch_size = config.batch_size if config.batch_size is not None else auto_batch_size(n_train)
    epochs = config.epochs if config.epochs is not None else auto_epochs(n_train, batch_size)
    return config.replace(batch_size=batch_size, epochs=epochs)
