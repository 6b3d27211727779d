"""imgcls advise: measure data size and similarity to ImageNet, map them to a transfer scenario.

Similarity is measured, not assumed: on the same small stratified subsample, a logistic regression
on frozen ImageNet features (EfficientNet-Lite0) competes with a small CNN trained from scratch to
convergence on the same images. Frozen features that cannot beat a scratch CNN given the same
labelled images mean the domain is far from ImageNet (README.md, "The advisor", has the figures for
Fashion-MNIST). The distance between the data's BatchNorm input statistics and the ImageNet
running statistics stored in the backbone is reported as a second, model-free view.

The advisor's two measurements are called trials; "probe" is the LP-FT head probe of training.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from imgcls.config import TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import epoch_generator, iterate_batches
from imgcls.data.transforms import parse_augment
from imgcls.errors import DataError
from imgcls.models import create_model, get_spec
from imgcls.models.weights import load_pretrained
from imgcls.runtime import make_runtime
from imgcls.train.budget import epochs_that_fit
from imgcls.train.features import pooled_features
from imgcls.train.inputs import resolve_preprocess
from imgcls.train.loop import evaluate, train_one_epoch
from imgcls.train.optim import StepSchedule, build_optimizer
from imgcls.train.run_folder import RunFolder
from imgcls.train.strategies import AUTO, get_strategy

FEATURE_BACKBONE = "efficientnet_lite0"  # ImageNet weights ship offline as a pip package
SCRATCH_MODEL = "scratch-cnn"
# Below ~1,000 labelled images per class a from-scratch CNN is data-starved on natural images
# (the usual rule of thumb).
LARGE_PER_CLASS = 1000
# Frozen features must beat the scratch trial by at least this much, and by two standard errors of
# the difference on the held-out split, to call the data ImageNet-like: a tie (or a win within the
# noise of a small held-out split) means the pretrained features add nothing a small CNN cannot
# learn in the same time.
SIMILARITY_MARGIN = 0.02
SCRATCH_TRIAL_SIDE = 64  # the scratch trial sees at most 64 px: it must stay a quick trial
SCRATCH_TRIAL_STEPS = 600  # enough for the scratch CNN to converge on ~1,000 images (batch 64)

SCENARIOS = {  # (large data, ImageNet-like) -> (scenario, strategy)
    (False, True): (1, "head"), (False, False): (2, "partial"),
    (True, False): (3, "scratch"), (True, True): (4, "finetune"),
}


@dataclass
class Advice:
    """The measurements, the scenario they map to and the command to run."""

    train_dir: str
    images: int
    classes: int
    per_class_min: int
    per_class_median: float
    image_size: tuple[int, int]
    channels: int
    probe_train: int  # the trials' subsample; the names stay as config.json files record them
    probe_holdout: int
    feature_acc: float
    scratch_acc: float
    feature_seconds: float
    scratch_seconds: float
    scratch_epochs: int
    bn_distance: float
    margin: float
    large: bool
    similar: bool
    scenario: int
    strategy: str
    model: str
    command: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Advice":
        return cls(**{**obj, "image_size": tuple(obj["image_size"])})

    def summary(self) -> str:
        """The evidence and the verdict, for the terminal."""
        gap = self.feature_acc - self.scratch_acc
        return "\n".join([
            f"data: {self.images} images, {self.classes} classes, {self.per_class_min} to "
            f"{self.per_class_median:.0f} (median) per class, {self.image_size[0]}x{self.image_size[1]} px, "
            f"{self.channels} channel{'s' if self.channels > 1 else ''} -> "
            f"{'large' if self.large else 'small'} (large: median >= {LARGE_PER_CLASS} per class)",
            f"trials: {self.probe_train} training / {self.probe_holdout} held-out images (stratified subsample)",
            f"  frozen ImageNet {FEATURE_BACKBONE} features + logistic regression: {self.feature_acc:.1%} "
            f"held-out accuracy ({self.feature_seconds:.0f}s)",
            f"  {SCRATCH_MODEL} from scratch, same images, {self.scratch_epochs} epochs "
            f"({self.scratch_seconds:.0f}s): {self.scratch_acc:.1%} held-out accuracy",
            f"  feature-statistics distance from ImageNet: {self.bn_distance:.2f} (mean |z| of the data's "
            f"channel means against the backbone's ImageNet BatchNorm statistics; 0 = identical)",
            f"similarity to ImageNet: {'high' if self.similar else 'low'} (frozen features minus scratch: "
            f"{gap:+.1%}; {'above' if self.similar else 'not above'} the {self.margin:.1%} needed to count)",
            f"scenario {self.scenario} ({'large' if self.large else 'small'} data, "
            f"{'high' if self.similar else 'low'} similarity) -> strategy {self.strategy}",
            f"run: {self.command}",
        ])


def trial_split(targets: np.ndarray, train_per_class: int, holdout_per_class: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified subsample: a third of each class (at most holdout_per_class) held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        if len(members) < 2:
            raise DataError(f"class index {cls} has {len(members)} image; the advisor needs at least 2 per class")
        rng.shuffle(members)
        n_held = max(1, min(holdout_per_class, len(members) // 3))
        held.extend(members[:n_held])
        train.extend(members[n_held:n_held + train_per_class])
    return np.sort(np.asarray(train)), np.sort(np.asarray(held))


class BatchNormStats:
    """Running per-channel means of every BatchNorm input, compared to the stored ImageNet statistics."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.sums = [torch.zeros(m.num_features, dtype=torch.float64) for m in self.layers]
        self.count = [0] * len(self.layers)
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(_module, inputs):
            x = inputs[0].detach().float()
            self.sums[i] += x.sum(dim=(0, 2, 3)).double().cpu()
            self.count[i] += x.shape[0] * x.shape[2] * x.shape[3]
        return hook

    def distance(self) -> float:
        """Mean over layers of mean |data mean - ImageNet mean| / ImageNet std, per channel."""
        for h in self.handles:
            h.remove()
        scores = []
        for layer, total, n in zip(self.layers, self.sums, self.count):
            if n and layer.running_mean is not None:
                z = (total / n - layer.running_mean.double()).abs() / (layer.running_var.double() + layer.eps).sqrt()
                scores.append(z.mean().item())
        return float(np.mean(scores)) if scores else float("nan")


def frozen_feature_trial(data: Dataset, train_idx: np.ndarray, held_idx: np.ndarray,
                  device: str = "auto") -> tuple[float, float, float]:
    """Held-out accuracy of logistic regression on frozen pretrained features; seconds; BN distance."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn is imported by the advisor only
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    config = TrainConfig(data_dir="", model=FEATURE_BACKBONE, strategy="head", pretrained=True)
    preprocess, _ = resolve_preprocess(config, data, torch.from_numpy(train_idx))
    model = create_model(FEATURE_BACKBONE, num_classes=2, in_chans=3)
    load_pretrained(model, get_spec(FEATURE_BACKBONE))
    runtime = make_runtime(device, "auto", True)
    model = model.to(runtime.device).to(memory_format=torch.channels_last)
    stats = BatchNormStats(model)
    kw = dict(preprocess=preprocess, runtime=runtime, batch_size=128)
    x_train = pooled_features(model, data.source, torch.from_numpy(train_idx), desc="advise features", **kw).numpy()
    bn_distance = stats.distance()  # from the training subsample only
    x_held = pooled_features(model, data.source, torch.from_numpy(held_idx), desc="advise features", **kw).numpy()
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(scaler.transform(x_train), data.targets.numpy()[train_idx])
    acc = float((clf.predict(scaler.transform(x_held)) == data.targets.numpy()[held_idx]).mean())
    return acc, time.perf_counter() - start, bn_distance


def scratch_trial_epochs(n_train: int, batch: int) -> int:
    """Epochs that give the scratch trial SCRATCH_TRIAL_STEPS optimizer steps, within [10, 100]."""
    return int(min(100, max(10, math.ceil(SCRATCH_TRIAL_STEPS / math.ceil(n_train / batch)))))


def scratch_trial(data: Dataset, train_idx: np.ndarray, held_idx: np.ndarray, max_s: float,
                  seed: int = 0, device: str = "auto") -> tuple[float, float, int]:
    """Held-out accuracy of the scratch CNN trained to convergence on the subsample (or for max_s seconds).

    Sized in optimizer steps, not seconds: a trial cut short by a busy machine would make the
    pretrained features look better than they are (README.md, "The advisor").
    """
    start = time.perf_counter()
    side = min(max(data.image_size), SCRATCH_TRIAL_SIDE)
    config = TrainConfig(data_dir="", model=SCRATCH_MODEL, image_size=side)
    preprocess, info = resolve_preprocess(config, data, torch.from_numpy(train_idx))
    torch.manual_seed(seed)
    model = create_model(SCRATCH_MODEL, num_classes=data.classes.num_classes, in_chans=info["in_chans"])
    runtime = make_runtime(device, "auto", True)
    model = model.to(runtime.device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer([{"name": "all", "params": list(model.parameters()), "lr": 3e-3}], 5e-2)
    augment, batch = parse_augment("auto", len(train_idx)), min(64, len(train_idx))
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    schedule = StepSchedule(optimizer, "onecycle", steps_per_epoch, scratch_trial_epochs(len(train_idx), batch))
    epoch = 0
    while epoch < schedule.epochs:
        t0 = time.perf_counter()
        gen = epoch_generator(seed, epoch)
        train_one_epoch(model, iterate_batches(data.source, data.targets, batch, shuffle=True, generator=gen,
                                               indices=torch.from_numpy(train_idx)),
                        optimizer=optimizer, preprocess=preprocess, runtime=runtime, generator=gen,
                        augment=augment, label_smoothing=0.1, on_step=schedule, total=steps_per_epoch)
        epoch += 1
        if epoch == 1:  # a slow machine: shrink the schedule to fit max_s rather than stop mid-schedule
            fitted = epochs_that_fit(max_s, 1, time.perf_counter() - start, time.perf_counter() - t0,
                                     at_most=schedule.epochs)
            schedule.epochs = max(2, fitted)
    held = evaluate(model, iterate_batches(data.source, data.targets, 256, indices=torch.from_numpy(held_idx)),
                    preprocess=preprocess, runtime=runtime)
    return float(held["acc"]), time.perf_counter() - start, schedule.epochs


def required_margin(p_features: float, p_scratch: float, n_held: int) -> float:
    """How far frozen features must lead: SIMILARITY_MARGIN, or two standard errors if larger."""
    se = math.sqrt((p_features * (1 - p_features) + p_scratch * (1 - p_scratch)) / max(n_held, 1))
    return max(SIMILARITY_MARGIN, 2 * se)


def recommend_command(train_dir: str, strategy: str) -> tuple[str, str]:
    """(model, the exact `imgcls train` command) for a strategy."""
    name = Path(train_dir).resolve().parent.name or "data"
    if get_strategy(strategy).transfers:
        model, flags = FEATURE_BACKBONE, f"--strategy {strategy} --pretrained"
    else:
        model, flags = SCRATCH_MODEL, f"--strategy {strategy}"
    out = f"runs/{name}-{model}-{strategy}"
    return model, f"imgcls train {shlex.quote(str(train_dir))} --out {out} --model {model} {flags}"


def advise(train_dir: str | os.PathLike, *, probe_per_class: int = 100, holdout_per_class: int = 50,
           max_scratch_s: float = 240.0, seed: int = 0, device: str = "auto",
           log: Callable[[str], None] = print, **dataset_options) -> Advice:
    """Measure size and ImageNet similarity on a subsample; map them to scenario 1-4."""
    start = time.perf_counter()
    data = load_dataset(train_dir, **dataset_options)
    targets = data.targets.numpy()
    counts = np.bincount(targets, minlength=data.classes.num_classes)
    if data.classes.num_classes < 2:
        raise DataError(f"{train_dir}: only one class; a classifier needs at least two")
    train_idx, held_idx = trial_split(targets, probe_per_class, holdout_per_class, seed)
    log(f"advise: probing on {len(train_idx)} + {len(held_idx)} held-out images of {len(targets)}")
    feature_acc, feature_s, bn_distance = frozen_feature_trial(data, train_idx, held_idx, device)
    log(f"advise: frozen-feature trial {feature_acc:.1%} in {feature_s:.0f}s; training the scratch trial")
    scratch_acc, scratch_s, scratch_epochs = scratch_trial(data, train_idx, held_idx, max_scratch_s, seed, device)
    large = float(np.median(counts)) >= LARGE_PER_CLASS
    margin = required_margin(feature_acc, scratch_acc, len(held_idx))
    similar = feature_acc - scratch_acc >= margin
    scenario, strategy = SCENARIOS[(large, similar)]
    model, command = recommend_command(str(train_dir), strategy)
    return Advice(str(train_dir), len(targets), int(data.classes.num_classes), int(counts.min()),
                  float(np.median(counts)), data.image_size, data.channels, len(train_idx), len(held_idx),
                  round(feature_acc, 4), round(scratch_acc, 4), round(feature_s, 1), round(scratch_s, 1),
                  scratch_epochs, round(bn_distance, 3), round(margin, 4), bool(large), bool(similar),
                  scenario, strategy, model, command,
                  round(time.perf_counter() - start, 1))


def resolve_auto(config: TrainConfig, out: str | os.PathLike, log: Callable[[str], None] = print,
                 device: str = "auto") -> TrainConfig:
    """--strategy auto: the advisor's strategy, its evidence recorded in config.json's extra.

    A run folder that was already started with auto keeps its decision, so a resume does not
    re-measure (and cannot flip strategy half-way).
    """
    prior = RunFolder(out)
    if prior.has(RunFolder.CONFIG):
        old = prior.read_config().to_json()
        if old.get("extra", {}).get("strategy_requested") == AUTO:
            return config.replace(model=old["model"], strategy=old["strategy"], pretrained=old["pretrained"],
                                  extra=old["extra"])
    advice = advise(config.data_dir, seed=config.seed, device=device, log=log,
                    id_column=config.id_column, label_column=config.label_column, on_bad=config.on_bad_image,
                    csv_path=config.csv)
    for line in advice.summary().splitlines():
        log(f"advise: {line}")
    model = config.model
    transfer = get_strategy(advice.strategy).transfers
    if transfer and not get_spec(model).pretrained_available:
        log(f"advise: {model} has no pretrained weights; using {advice.model} for strategy {advice.strategy}")
        model = advice.model
    extra = {**config.extra, "strategy_requested": AUTO, "advice": advice.to_json()}
    return config.replace(model=model, strategy=advice.strategy, pretrained=transfer and not config.weights,
                          extra=extra)
