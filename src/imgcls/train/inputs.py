"""What a model's input looks like: channels, side and normalisation, resolved from the model and the data."""

from __future__ import annotations

import torch

from imgcls.config import TrainConfig
from imgcls.data import Dataset
from imgcls.data.transforms import Preprocess
from imgcls.models import get_spec
from imgcls.models.registry import check_input_size


def resolve_preprocess(config: TrainConfig, data: Dataset, train_idx: torch.Tensor) -> tuple[Preprocess, dict]:
    """Input channels, size and normalisation for the model, and the record of it for the run."""
    spec = get_spec(config.model)
    in_chans = data.channels if spec.family == "scratch" else 3
    side = config.image_size or spec.default_image_size
    if spec.family == "timm" and not config.image_size:
        from imgcls.models.backbones import input_side  # imports timm: only for timm models
        side = input_side(spec, max(data.image_size))
    check_input_size(spec, (side, side) if side else data.image_size, None if side else str(data.table.source))
    size = (side, side) if side else None
    if spec.mean is not None:
        mean, std = spec.mean, spec.std
    else:
        # Scratch models: normalise with the training split's own statistics.
        mean, std = data.source.channel_stats(train_idx)
        std = tuple(max(s, 1e-3) for s in std)
        if in_chans != data.channels:
            mean, std = mean * in_chans if len(mean) == 1 else mean, std * in_chans if len(std) == 1 else std
    preprocess = Preprocess(tuple(mean), tuple(std), in_chans, size)
    info = {"name": config.model, "in_chans": in_chans, "image_size": list(size) if size else None,
            "data_channels": data.channels, "data_size": list(data.image_size), "resize": data.resize,
            "mean": list(mean), "std": list(std)}
    if "recipe" in spec.extra:
        # The shape the registry builds today, recorded so that the run folder rebuilds this
        # network even after the recipe under the same name changes (RunFolder.load_model).
        info["kwargs"] = dict(spec.extra["recipe"])
    return preprocess, info
