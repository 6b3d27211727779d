"""A model without dropout or BatchNorm, and a torchrun worker, for tests/test_distributed.py.

With no per-process randomness and no per-process batch statistics, DDP on N processes computes
the same global-batch gradient as one process, so the trained weights must match.
Run as: torchrun --nproc_per_node 2 tests/ddp_support.py PLAN.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from imgcls.models.registry import ModelSpec, _REGISTRY, register_model

MODEL = "test-mlp"


class TinyMLP(nn.Module):
    """Pool to 8x8, one hidden layer, linear head: the timm-like surface the strategies need."""

    head_dropout = 0.0  # read by the cached-feature head trainer

    def __init__(self, num_classes: int, in_chans: int = 1, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_chans * 64, hidden),
                                  nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.fc.in_features, num_classes)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("body", list(self.body.parameters())), ("head", list(self.fc.parameters()))]


def register() -> None:
    """Idempotent: pytest imports this module in-process, the workers import it again."""
    if MODEL not in _REGISTRY:
        register_model(ModelSpec(MODEL, lambda num_classes, in_chans=1, pretrained=False, **kw:
                                 TinyMLP(num_classes, in_chans), "test MLP without dropout or BatchNorm"))


class StopAt:
    """Stands in for apply_epoch and raises KeyboardInterrupt (as Ctrl-C would) when `epoch` starts."""

    def __init__(self, apply_epoch, epoch: int):
        self.apply_epoch, self.epoch = apply_epoch, epoch

    def __call__(self, model: nn.Module, config, epoch: int) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt
        self.apply_epoch(model, config, epoch)


def run_plan(plan: list[dict]) -> None:
    """Each entry: {"config": TrainConfig fields, "out": folder, "shards": folder, "interrupt_at": epoch?}."""
    from imgcls.config import TrainConfig
    from imgcls.train import runner
    from imgcls.train.distributed import SHARD_LOG_ENV

    for entry in plan:
        os.environ[SHARD_LOG_ENV] = entry["shards"]
        config = TrainConfig(**entry["config"])
        if "interrupt_at" in entry:
            original = runner.apply_epoch
            runner.apply_epoch = StopAt(original, entry["interrupt_at"])
            try:
                runner.fit(config, entry["out"], device="cpu", log=lambda _: None)
                raise AssertionError("the interruption did not happen")
            except KeyboardInterrupt:
                pass
            finally:
                runner.apply_epoch = original
        runner.fit(config, entry["out"], device="cpu", log=lambda _: None)  # resumes an interrupted run


if __name__ == "__main__":
    from imgcls.train.distributed import shutdown_distributed

    register()
    try:
        run_plan(json.loads(Path(sys.argv[1]).read_text()))
    finally:
        shutdown_distributed()
