"""Frozen run configuration, saved as config.json in every run folder."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import textwrap
from dataclasses import dataclass, field

from imgcls.errors import OptionError

BN_STATS = ("auto", "train", "frozen")  # valid TrainConfig.bn_stats values
# Below this many training images the "auto" choices treat a dataset as small: shift augmentation
# (data/transforms.py) and frozen BatchNorm statistics when transferring (train/strategies.py).
SMALL_DATA_BELOW = 10_000
TTA_MODES = ("none", "flip", "flip-shift")  # test-time augmentation for evaluate / predict (predict.tta_views)
SCHEDULES = ("onecycle", "cosine", "constant")  # learning-rate schedules (train/optim.py lr_factor)
ON_BAD_IMAGE = ("fail", "skip")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "mixed")  # runtime.PRECISIONS
TRACKERS = ("none", "tensorboard")  # train/tracking.py open_tracker
RESIZE_POLICIES = ("crop", "squash", "pad")  # how images of another shape are fitted (data/images.py)
PSEUDO_TARGETS = ("soft", "hard")  # targets of pseudo-labelled images (train/pseudo.py)


def choices(values: tuple[str, ...], **metadata) -> dict:
    """Field metadata: the values the command line accepts for a field."""
    return {"choices": values, **metadata}


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
        raise OptionError(f"cannot read duration {text!r}; use e.g. 90s, 5m, 1.5h") from None


def parse_auto_int(text: str | int | None) -> int | None:
    """'auto' (or nothing) -> None, sized from the data at run time; else a positive integer."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise OptionError(f"cannot read {text!r} as a whole number; use e.g. 32, or auto") from None
    if value < 1:
        raise OptionError(f"{value}: must be at least 1 (or auto)")
    return value


LR_AUTO = "auto"  # TrainConfig.lr: run the range test (train/lr_find.py) and use its suggestion


def parse_lr(text: str | float) -> float | str:
    """'auto' or a positive learning rate such as 3e-3."""
    if isinstance(text, str) and text.strip().lower() == LR_AUTO:
        return LR_AUTO
    try:
        value = float(text)
    except ValueError:
        raise OptionError(f"cannot read learning rate {text!r}; use e.g. 3e-3, or auto") from None
    if not value > 0:
        raise OptionError(f"learning rate {value}: must be above 0 (or auto)")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes."""

    data_dir: str
    """Training dataset folder (CSV + images, or class subfolders)."""
    model: str = "scratch-cnn"
    """Registry name (see `imgcls models`)."""
    strategy: str = "scratch"
    """How much of a pretrained backbone trains: a registered strategy (train/strategies.py), or
    auto (the advisor measures the data and decides, as `imgcls advise` does)."""
    pretrained: bool = False
    """Start from ImageNet weights (never silently falls back to random init)."""
    weights: str | None = None
    """Weight file to start from (safetensors or a weights-only state dict)."""
    epochs: int | None = field(default=None, metadata={"parse": parse_auto_int, "unset": "auto"})
    """Upper bound on epochs; --time-budget may lower it to fit. auto: enough epochs for 600 optimizer
    steps, 10 to 100 (10 on 50,000 images in batches of 128)."""
    time_budget_s: float | None = field(default=None, metadata={"flag": "time-budget", "parse": parse_duration})
    """Wall-clock budget for training, e.g. 90s, 5m, 1.5h; the schedule is sized to fit it."""
    batch_size: int | None = field(default=None, metadata={"parse": parse_auto_int, "unset": "auto"})
    """Images per optimizer step, global: under torchrun each of N processes takes batch/N of it.
    auto: the largest power of two from 16 to 128 that gives 16 steps an epoch (128 from 2,048
    training images up)."""
    lr: float | str = field(default=4e-3, metadata={"parse": parse_lr})
    """Peak one-cycle learning rate for AdamW (head learning rate for transfer); auto: the
    learning-rate range test's suggestion, as `imgcls lr-find` prints it."""
    weight_decay: float = 5e-2
    """AdamW decoupled weight decay."""
    label_smoothing: float = 0.1
    """Softer targets: keeps the short schedules from over-confident logits."""
    schedule: str = field(default="onecycle", metadata=choices(SCHEDULES))
    """onecycle (warm-up then cosine anneal), cosine, or constant."""
    augment: str = "auto"
    """Batched augmentation: auto, none, or parts joined by -: flip, shift / shiftN (in stored-image
    pixels), erase; e.g. flip-shift4-erase."""
    val_fraction: float = 0.1
    """Stratified share of train held out for model selection."""
    seed: int = 0
    """Seeds split, init, data order and augmentation."""
    image_size: int | None = None
    """Model input side in pixels; unset: the model's default, else the data's own size."""
    resize: str = field(default="crop", metadata=choices(RESIZE_POLICIES))
    """How images of another shape are fitted to the stored square: crop (centre), squash, pad."""
    precision: str = field(default="auto", metadata=choices(PRECISION_CHOICES))
    """auto: bf16 where the hardware is fast at it, and on CPU mixed for models with depthwise
    convolutions; mixed: bf16 with the depthwise convolutions of training steps in fp32; fp32; bf16."""
    channels_last: bool = True
    """NHWC memory format: faster convolutions on CPU and GPU."""
    ema_decay: float | None = None
    """Validate, keep and predict with an exponential moving average of the weights, updated after
    every step with this decay (0: off; e.g. 0.999 averages about the last 1,000 steps); None
    (auto): the model's recipe in the registry, else off."""
    compile: bool = False
    """torch.compile the model for training and validation (inductor fuses convolution, BatchNorm
    and activation on CPU and GPU); its compile time counts against --time-budget. Falls back to
    eager with a one-line notice where compiling fails."""
    freeze_stages: int | None = None
    """partial: how many stem-side parameter groups stay frozen."""
    backbone_lr_mult: float = 0.1
    """finetune: backbone learning rate = lr x this."""
    warmup_epochs: int | None = None
    """Head-only epochs on images before the backbone unfreezes, for finetune; None (auto): none
    after a head probe (the probe is the warm-up), else 1."""
    head_probe_epochs: int | None = None
    """finetune / partial: first fit the new head on cached frozen-backbone features for this many
    epochs (LP-FT), so the backbone starts training under a head that already fits; 0 skips it;
    None (auto): 30 when the pretrained BatchNorm statistics are kept (see bn_stats), else 0."""
    bn_stats: str = field(default="auto", metadata=choices(BN_STATS))
    """BatchNorm of trainable layers: train (batch statistics, running stats adapt), frozen
    (pretrained running statistics kept, affine parameters still train), or auto (frozen when
    fine-tuning pretrained weights on fewer than 10,000 training images
    (SMALL_DATA_BELOW), else train)."""
    cache_features: bool = True
    """head strategy: run the frozen backbone once and train the head on cached features (turning
    it off runs the backbone every epoch, which lets --augment apply)."""
    per_class: int | None = None
    """Use at most this many training images per class (data-efficiency experiments)."""
    on_bad_image: str = field(default="fail", metadata=choices(ON_BAD_IMAGE))
    """fail: stop listing bad images; skip: quarantine them and train on the rest."""
    csv: str | None = None
    """The dataset's CSV file, when its folder holds several (default: <folder name>.csv or the only one)."""
    id_column: str | None = None
    """Name of the image-id column (default: detected: id / image / filename / file)."""
    label_column: str | None = None
    """Name of the label column (default: detected: label / class / target)."""
    tracking: str = field(default="none", metadata=choices(TRACKERS, flag="log"))
    """Also log each epoch's loss, accuracy, lr and images/s to TensorBoard (RUN/tensorboard/;
    pip install 'imgcls[tensorboard]'); metrics.jsonl is written either way."""
    teacher: str | None = None
    """Distillation: a run or ensemble folder whose probabilities on the training images (computed
    once) become the targets, mixed with the labels by --distill-weight (train/distill.py)."""
    distill_temperature: float = 1.0
    """Softmax temperature applied to the teacher's logits: above 1 spreads its probabilities over
    the runner-up classes, towards 0 it approaches the teacher's hard labels."""
    distill_weight: float = 1.0
    """Share of the teacher in the targets (1: the teacher's probabilities alone, 0: the labels alone)."""
    unlabelled: str | None = None
    """Pseudo-labels: a dataset folder of unlabelled images (its labels, if any, are ignored); those
    the --teacher is confident about join training (train/pseudo.py). Never the validation images."""
    pseudo_threshold: float = 0.9
    """Top teacher probability an unlabelled image needs to join training."""
    pseudo_targets: str = field(default="soft", metadata=choices(PSEUDO_TARGETS))
    """soft: the teacher's probabilities (at --distill-temperature) as the target; hard: its top class."""
    teacher_tta: str = field(default="none", metadata=choices(TTA_MODES))
    """The teacher's test-time augmentation for its targets and pseudo-labels: its probabilities
    averaged over the views (flip: the image and its mirror), one more teacher pass per view."""
    extra: dict = field(default_factory=dict, metadata={"option": False})
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
        """The fields that make two runs the same run (a budget, an epoch cap or tracking does not)."""
        obj = self.to_json()
        for volatile in ("epochs", "time_budget_s", "tracking", "extra"):
            obj.pop(volatile)
        return obj

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string right below it), read from the source with ast:
    the one place an option is explained, for the dataclass reader and the command line alike."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
