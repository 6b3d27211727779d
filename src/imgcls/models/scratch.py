"""Small CNNs trained from scratch: the baseline every transfer strategy has to beat."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcls.models.registry import ModelSpec, register_model
from imgcls.errors import OptionError


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _bin_weights(size: int, bins: int) -> list[list[float]]:
    """Row i averages input cells [floor(i*size/bins), ceil((i+1)*size/bins)): adaptive pooling's bins."""
    rows = []
    for i in range(bins):
        start, end = (i * size) // bins, -(-(i + 1) * size // bins)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    return rows


class GridAvgPool(nn.Module):
    """Average pooling to a fixed `grid` x `grid` output, exportable to ONNX at every input size.

    adaptive_avg_pool2d exports only when the grid divides the feature map (the default CNN: 28 px
    only), so a graph being traced or exported gets the same bins as two small matrix products.
    Eager runs keep adaptive_avg_pool2d itself: its results, bit for bit, are what every run
    trained so far (and the recorded weights of the golden tests) came from. No parameters, so
    state dicts are those of the nn.AdaptiveAvgPool2d this replaces.
    """

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return F.adaptive_avg_pool2d(x, self.grid)
        return self.as_matrix_products(x)

    def as_matrix_products(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])  # constants in the exported graph
        rows = torch.tensor(_bin_weights(height, self.grid), dtype=x.dtype, device=x.device)
        cols = torch.tensor(_bin_weights(width, self.grid), dtype=x.dtype, device=x.device)
        return rows @ x @ cols.T


class ScratchCNN(nn.Module):
    """VGG-style stages (two 3x3 convs each, max-pool between), global pooling, linear head.

    Exposes the same surface as timm backbones (forward_features / forward_head /
    get_classifier / reset_classifier / param_groups) so strategies treat it generically.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128),
                 depths: tuple[int, ...] = (2, 2, 2), drop_rate: float = 0.2, hidden: int = 0,
                 grid: int = 7):
        super().__init__()
        stages, c = [], in_chans
        for i, (width, depth) in enumerate(zip(widths, depths)):
            pool = [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
            convs = [conv_bn(c if j == 0 else width, width) for j in range(depth)]
            stages.append(nn.Sequential(*convs, *pool))
            c = width
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(drop_rate)
        if hidden:
            # Keep a coarse spatial grid instead of global pooling: where a shape sits (collar,
            # sleeves, heel) separates look-alike classes, and the FC costs few FLOPs.
            self.pool = nn.Sequential(GridAvgPool(grid), nn.Flatten())
            self.hidden = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(c * grid * grid, hidden),
                                        nn.ReLU(inplace=True))
            self.num_features = hidden
        else:
            self.pool = nn.Sequential(GridAvgPool(1), nn.Flatten())
            self.hidden = nn.Identity()
            self.num_features = c
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.hidden(self.pool(features))
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameters from stem to head, one group per stage, head last."""
        groups = [(f"stage{i}", list(stage.parameters())) for i, stage in enumerate(self.stages)]
        return groups + [("head", list(self.hidden.parameters()) + list(self.fc.parameters()))]


def _builder(widths: tuple[int, ...], depths: tuple[int, ...] = (2, 2, 2), **defaults):
    def build(num_classes: int, in_chans: int = 1, pretrained: bool = False, **kwargs) -> ScratchCNN:
        if pretrained:
            raise OptionError("scratch CNNs have no pretrained weights; drop --pretrained")
        return ScratchCNN(num_classes, in_chans, **{"widths": widths, "depths": depths, **defaults, **kwargs})
    return build


# Shapes chosen by measurement on Fashion-MNIST (benchmarks/scratch_sweep.py): at 28 px one conv
# at full resolution is enough, and a 7x7 grid + FC head beats global pooling at the same FLOPs.
register_model(ModelSpec("scratch-cnn", _builder((32, 64, 128), (1, 2, 2), hidden=256),
                         "5-conv CNN + 7x7-grid FC head (~1.9M params, ~24M MACs at 28 px), the default baseline"))
# The same shape with the weight average on (the recipe's --ema-decay when the option is not given):
# validation, the kept model and prediction use the average of about the last 100 steps.
register_model(ModelSpec("scratch-cnn-ema", _builder((32, 64, 128), (1, 2, 2), hidden=256),
                         "scratch-cnn trained with a weight EMA (decay 0.99) unless --ema-decay says otherwise",
                         extra={"ema_decay": 0.99}))
register_model(ModelSpec("scratch-cnn-wide", _builder((64, 128, 256)),
                         "6-conv CNN, global pooling (~1.1M params, ~116M MACs at 28 px): slower, for GPUs"))
register_model(ModelSpec("scratch-cnn-tiny", _builder((8, 16, 32)),
                         "tiny CNN for tests and smoke runs"))
