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
            if x.shape[-2:] == (self.grid, self.grid):
                return x  # one cell a bin: the same values, without two passes over the features
            return F.adaptive_avg_pool2d(x, self.grid)
        return self.as_matrix_products(x)

    def as_matrix_products(self, x: torch.Tensor) -> torch.Tensor:
        height, width = int(x.shape[-2]), int(x.shape[-1])  # constants in the exported graph
        rows = torch.tensor(_bin_weights(height, self.grid), dtype=x.dtype, device=x.device)
        cols = torch.tensor(_bin_weights(width, self.grid), dtype=x.dtype, device=x.device)
        return rows @ x @ cols.T


class PatchWhitening(nn.Module):
    """A frozen first layer that decorrelates the pixels of every `size` x `size` patch: its filters
    are the eigenvectors of the training patches' covariance, each scaled to unit variance, with
    both signs (the ReLU after the next convolution keeps both halves of each direction). The
    fast CIFAR-10 recipes start this way: the first learned layer sees inputs of equal variance in
    every direction and needs fewer steps to fit. The filters are a buffer: they are saved with the
    model, never trained, and `fit` computes them once from normalised training images.
    """

    def __init__(self, in_chans: int, size: int = 2, eps: float = 5e-4):
        super().__init__()
        self.size, self.eps = size, eps
        self.out_chans = 2 * in_chans * size * size
        self.register_buffer("weight", torch.zeros(self.out_chans, in_chans, size, size))

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """The filters for normalised N x C x H x W `images`."""
        channels = images.shape[1]
        patches = F.unfold(images.float(), self.size).transpose(1, 2).reshape(-1, channels * self.size ** 2)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / (eigenvalues.clamp(min=0) + self.eps).sqrt().view(-1, 1)).float()
        filters = filters.flip(0).reshape(-1, channels, self.size, self.size)  # largest variance first
        self.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padded right and bottom only: the output keeps the input's size (an even patch has no centre).
        return F.conv2d(F.pad(x, (0, self.size - 1, 0, self.size - 1)), self.weight)


class ScratchCNN(nn.Module):
    """VGG-style stages (two 3x3 convs each, max-pool between), global pooling, linear head.

    Exposes the same surface as timm backbones (forward_features / forward_head /
    get_classifier / reset_classifier / param_groups) so strategies treat it generically.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128),
                 depths: tuple[int, ...] = (2, 2, 2), drop_rate: float = 0.2, hidden: int = 0,
                 grid: int = 7, whiten: int = 0):
        super().__init__()
        # whiten: the side of the patches a frozen PatchWhitening layer decorrelates first (0: none).
        self.whiten = PatchWhitening(in_chans, whiten) if whiten else None
        stages, c = [], self.whiten.out_chans if whiten else in_chans
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
        return self.stages(x if self.whiten is None else self.whiten(x))

    def fit_to_data(self, images: torch.Tensor) -> None:
        """What the model computes from normalised training images before training: the whitening filters."""
        if self.whiten is not None:
            self.whiten.fit(images)

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
# The 5-minute recipe on CPUs (README "The scratch baseline in five minutes"): scratch-cnn's layout
# at half its widths (under a third of its multiply-adds: in five minutes on 2 cores ~9 epochs, not
# ~3, which beat the wider networks at equal time), after a frozen 2x2 patch-whitening layer,
# without dropout (a few epochs do not overfit), with the weight average on;
# benchmarks/scratch_sweep.py --ablation measures each choice. run.json records the recipe, and the
# model record the shape, so a run folder keeps its network when this recipe changes.
SPEEDRUN = {"widths": (16, 32, 64), "depths": (1, 2, 2), "hidden": 256, "whiten": 2, "drop_rate": 0.0}
register_model(ModelSpec("scratch-speedrun", _builder(**SPEEDRUN),
                         "scratch-cnn at half width after a frozen patch-whitening layer, no dropout, weight EMA "
                         "(decay 0.99): the 5-minute CPU recipe", extra={"ema_decay": 0.99, "recipe": SPEEDRUN}))
