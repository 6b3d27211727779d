"""An exponential moving average of a model's weights: what validation, the best model and prediction use.

Averaging the weights of the last few hundred steps smooths out the noise of the final steps of
a short schedule, so a few epochs reach the accuracy of more (a habit of the fast CIFAR-10
training recipes). The average is a second copy of the model that never trains: validating it and
saving it as the best model needs no weight swapping, and under torchrun every process updates
its copy from identical weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from imgcls.errors import OptionError


class WeightEMA:
    """average <- d * average + (1 - d) * weights after every optimizer step, with the decay warmed
    up as d = min(decay, n / (10 + n)) at the n-th update (0-based): the first update copies the
    weights, so neither the initial weights nor anything done to the model before training (a head
    probe) lingers in the average. BatchNorm running statistics are averaged the same
    way; integer buffers (batch counters) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise OptionError(f"--ema-decay {decay:g}: use a decay between 0 and 1 (e.g. 0.999), or 0 for off")
        self.source, self.decay, self.updates = model, decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._floats = [(a, s) for a, s in self._pairs if a.is_floating_point()]
        self._others = [(a, s) for a, s in self._pairs if not a.is_floating_point()]

    def current_decay(self) -> float:
        return min(self.decay, self.updates / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the source model's current weights into the average (call after each optimizer step)."""
        weight = 1.0 - self.current_decay()
        averages, sources = [a for a, _ in self._floats], [s for _, s in self._floats]
        torch._foreach_lerp_(averages, sources, weight)  # one fused pass over all tensors
        for average, source in self._others:
            average.copy_(source)
        self.updates += 1

    def state_dict(self) -> dict:
        """What a resume checkpoint keeps: the averaged weights and the update count."""
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, saved: dict) -> None:
        self.module.load_state_dict(saved["weights"])
        self.updates = int(saved["updates"])


def make_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    """The average of `model`'s weights, or None when decay is 0 (off)."""
    return None if decay == 0 else WeightEMA(model, decay)
