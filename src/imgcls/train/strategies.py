"""Transfer strategies: which parameter groups train, at which learning rate."""

from __future__ import annotations

import torch.nn as nn

from imgcls.config import TrainConfig

STRATEGIES = ("scratch",)


def param_groups_for(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimizer groups {"name", "params", "lr"} for the configured strategy."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; valid: {', '.join(STRATEGIES)}")
    return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
