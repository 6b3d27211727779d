"""Freezing by parameter group: one mechanism for every model that has param_groups()."""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn


def param_groups(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(name, params) from stem to head; models without the surface count as one group plus none."""
    if hasattr(model, "param_groups"):
        return model.param_groups()
    return [("all", list(model.parameters()))]


def set_trainable(params: Iterable[nn.Parameter], trainable: bool) -> None:
    for p in params:
        p.requires_grad_(trainable)


def freeze_all_but(model: nn.Module, trainable_groups: set[str]) -> None:
    """requires_grad on exactly the named groups; everything else frozen."""
    for name, params in param_groups(model):
        set_trainable(params, name in trainable_groups)


def train_mode(model: nn.Module, bn_stats: str = "train") -> nn.Module:
    """model.train(), but BatchNorm whose parameters are all frozen stays in eval mode, and with
    bn_stats="frozen" every BatchNorm does (its affine parameters still train).

    A frozen layer must stay frozen: in train mode BatchNorm would still update its running
    statistics and normalise with batch statistics, changing what the frozen backbone computes.
    Frozen statistics matter for LP-FT too: the probe's head was fitted to features normalised
    with the pretrained running statistics, and batch statistics of a distant domain change
    those features at once (the first fine-tune epoch then falls far below the probe's accuracy).
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if bn_stats == "frozen" or (own and not any(p.requires_grad for p in own)):
                module.eval()
    return model
