"""Frozen run configuration, saved as config.json in every run folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field


BN_STATS = ("auto", "train", "frozen")  # valid TrainConfig.bn_stats values
# Below this many training images the "auto" choices treat a dataset as small: shift augmentation
# (data/transforms.py) and frozen BatchNorm statistics when transferring (train/strategies.py).
SMALL_DATA_BELOW = 10_000
TTA_MODES = ("none", "flip")  # test-time augmentation for evaluate / predict


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    data_dir: str
    """Training dataset folder (CSV + images, or class subfolders)."""
    model: str = "scratch-cnn"
    """Registry name (see `imgcls models`)."""
    strategy: str = "scratch"
    """How much of a pretrained backbone trains: head / partial / scratch / finetune."""
    pretrained: bool = False
    """Start from ImageNet weights (never silently falls back to random init)."""
    weights: str | None = None
    """Explicit weight file (safetensors or a weights-only state dict)."""
    epochs: int = 10
    """Upper bound on epochs; --time-budget may lower it to fit."""
    time_budget_s: float | None = None
    """Wall-clock budget for training; the schedule is sized to fit it."""
    batch_size: int = 128
    """Images per optimizer step (global across processes); the setting the Fashion-MNIST targets were measured with."""
    lr: float = 4e-3
    """Peak one-cycle learning rate for AdamW (head learning rate for transfer)."""
    weight_decay: float = 5e-2
    """AdamW decoupled weight decay."""
    label_smoothing: float = 0.1
    """Softer targets: keeps the short schedules from over-confident logits."""
    schedule: str = "onecycle"
    """onecycle (warm-up then cosine anneal) or cosine."""
    augment: str = "auto"
    """Batched augmentation: auto / none / flip-shiftN-erase parts (see parse_augment)."""
    val_fraction: float = 0.1
    """Stratified share of train held out for model selection."""
    seed: int = 0
    """Seeds split, init, data order and augmentation."""
    image_size: int | None = None
    """Model input side in pixels; None: the model's default, else the data's own size."""
    resize: str = "crop"
    """How images of another shape are fitted to the stored square: crop (centre), squash, pad."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware has it), fp32, bf16."""
    channels_last: bool = True
    """NHWC memory format: faster convolutions on CPU and GPU."""
    freeze_stages: int | None = None
    """For the partial strategy: how many stem-side parameter groups stay frozen."""
    backbone_lr_mult: float = 0.1
    """Backbone learning rate = lr x this, for finetune."""
    warmup_epochs: int | None = None
    """Head-only epochs on images before the backbone unfreezes, for finetune; None (auto): none
    after a head probe (the probe is the warm-up), else 1."""
    head_probe_epochs: int | None = None
    """finetune / partial: first fit the new head on cached frozen-backbone features for this many
    epochs (LP-FT), so the backbone starts training under a head that already fits; 0 skips it;
    None (auto): 30 when the pretrained BatchNorm statistics are kept (see bn_stats), else 0."""
    bn_stats: str = "auto"
    """BatchNorm of trainable layers: train (batch statistics, running stats adapt), frozen
    (pretrained running statistics kept, affine parameters still train), or auto (frozen when
    fine-tuning pretrained weights on fewer than SMALL_DATA_BELOW images, else train)."""
    cache_features: bool = True
    """head strategy: run the frozen backbone once and train the head on cached features."""
    per_class: int | None = None
    """Use at most this many training images per class (data-efficiency experiments)."""
    on_bad_image: str = "fail"
    """fail: stop listing bad images; skip: quarantine them and train on the rest."""
    id_column: str | None = None
    label_column: str | None = None
    extra: dict = field(default_factory=dict)
    """Free-form settings recorded with the run (e.g. the advisor's evidence)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def identity(self) -> dict:
        """The fields that make two runs the same run (a budget or epoch cap does not)."""
        obj = self.to_json()
        for volatile in ("epochs", "time_budget_s", "extra"):
            obj.pop(volatile)
        return obj

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def parse_duration(text: str | float | None) -> float | None:
    """'90s', '5m', '1.5h' or a number of seconds -> seconds."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ValueError(f"cannot read duration {text!r}; use e.g. 90s, 5m, 1.5h") from None
