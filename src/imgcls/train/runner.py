"""fit(): from a config to a finished, self-describing run folder (resumable at epoch boundaries)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls.advise import resolve_auto
from imgcls.check import preflight_warnings
from imgcls.config import TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import epoch_generator, num_batches
from imgcls.data.source import ConcatSource
from imgcls.data.split import per_class_subset, stratified_split
from imgcls.data.transforms import Augment, Preprocess, parse_augment
from imgcls.errors import DataError, OptionError, RunFolderError
from imgcls.models import create_model, get_spec
from imgcls.models.freeze import train_mode
from imgcls.models.weights import load_pretrained
from imgcls.runtime import Runtime, keep_depthwise_convs_in_fp32, make_runtime
from imgcls.train.budget import BudgetPlanner
from imgcls.train.distill import check_distillation, load_teacher, teacher_targets
from imgcls.train.pseudo import pseudo_labels
from imgcls.train.distributed import Dist, init_distributed
from imgcls.train.features import (FeatureCache, build_feature_cache, evaluate_head, probe_head,
                                   train_head_epoch)
from imgcls.train.inputs import resolve_preprocess
from imgcls.train.loop import evaluate, train_one_epoch
from imgcls.train.optim import StepSchedule, build_optimizer, count_parameters
from imgcls.train.run_folder import RunFolder, data_fingerprint
from imgcls.train.strategies import (apply_epoch, asks_the_advisor, check_strategy, freeze_backbone,
                                     get_strategy, param_groups_for)


@dataclass
class Prepared:
    """Everything built before the first epoch."""

    data: Dataset
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    model: torch.nn.Module
    preprocess: Preprocess
    runtime: Runtime
    model_info: dict
    extra: dict = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)
    train_targets: torch.Tensor | None = None  # distillation: soft targets per row (else the labels)

    @property
    def training_targets(self) -> torch.Tensor:
        return self.data.targets if self.train_targets is None else self.train_targets


def prepare(config: TrainConfig, device: str = "auto") -> Prepared:
    """Load data, split it, build model and preprocessing."""
    check_strategy(config)  # before the data load: a bad combination fails at once
    if config.teacher or config.unlabelled:
        check_distillation(config)
    data = load_dataset(config.data_dir, on_bad=config.on_bad_image, csv_path=config.csv,
                        id_column=config.id_column, label_column=config.label_column, resize=config.resize,
                        input_side=config.image_size or get_spec(config.model).default_image_size)
    if data.classes.num_classes < 2:
        raise DataError(f"{data.table.source}: only one class ({data.classes.labels[0]!r}); "
                        f"a classifier needs at least two")
    train_np, val_np = stratified_split(data.targets.numpy(), config.val_fraction, config.seed)
    if config.per_class:
        train_np = train_np[per_class_subset(data.targets.numpy()[train_np], config.per_class, config.seed)]
    train_idx, val_idx = torch.from_numpy(train_np), torch.from_numpy(val_np)
    preprocess, info = resolve_preprocess(config, data, train_idx)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.classes.num_classes, in_chans=info["in_chans"])
    extra = {"strategy": config.strategy}
    if config.pretrained or config.weights:
        extra["weights"] = load_pretrained(model, get_spec(config.model), config.weights)
    runtime = make_runtime(device, config.precision, config.channels_last, model=model)
    if runtime.depthwise_fp32:
        keep_depthwise_convs_in_fp32(model)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(data, train_idx, val_idx, model, preprocess, runtime, info, extra)


def write_run_description(out: Path, config: TrainConfig, prepared: Prepared) -> None:
    """classes, split, quarantine, then config: what predict/serve/report need. The config comes
    last, so a folder holding it provably holds the others (see RunFolder.is_run_folder)."""
    folder = RunFolder(out)
    folder.write_classes(prepared.data.classes, prepared.data.table.id_column, prepared.data.table.label_column)
    ids = prepared.data.ids
    folder.write_split({
        "seed": config.seed, "val_fraction": config.val_fraction, "per_class": config.per_class,
        "train_count": len(prepared.train_idx), "val_ids": [ids[i] for i in prepared.val_idx.tolist()]})
    if prepared.data.bad:
        folder.write_quarantine(prepared.data.bad)
    folder.write_config(config)


def fit(config: TrainConfig, out: str | Path, *, overwrite: bool = False, resume: bool = False,
        device: str = "auto", log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train (or resume, or report an already complete run) and return run.json's content.

    `resume` only continues: it refuses a folder with no run in it (a mistyped --out would
    otherwise start a new run from scratch). `clock` times the epochs for the time budget."""
    if resume and overwrite:
        raise OptionError("--resume continues the run in --out and --overwrite replaces it: choose one")
    out = Path(out)
    folder = RunFolder(out)
    dist = init_distributed(device)  # a single process unless started by torchrun
    dist.check_batch_size(config.batch_size)
    log = log if dist.is_main else (lambda line: None)
    if asks_the_advisor(config):  # advisor runs once (rank 0); evidence goes into config.json
        config = dist.from_main(lambda: resolve_auto(config, out, log, device))
    folder_status = dist.from_main(lambda: folder.prepare(config, overwrite))
    if resume and folder_status == "new":
        raise RunFolderError(f"{out}: no run to resume (the folder is missing or empty); "
                             f"drop --resume to start one")
    if folder_status == "complete":
        log(f"{out}: run already complete (use --overwrite to train again)")
        return folder.read_run()
    for line in preflight_warnings(config.data_dir, config.id_column, config.label_column, csv_path=config.csv):
        log(f"warning: {line}")
    with dist.main_first():  # rank 0 builds the decode cache, the others read it
        # Bad rows are listed and stop the run here.
        prepared = prepare(config, str(dist.device) if dist.enabled else device)
    prepared.dist = dist
    # A teacher of other classes is refused before anything is written.
    teacher = load_teacher(config, prepared.data, str(dist.device) if dist.enabled else device) \
        if config.teacher else None
    if dist.enabled:
        prepared.extra["world_size"] = dist.world_size
    if prepared.data.bad:
        log(f"quarantined {len(prepared.data.bad)} bad rows or images (reasons in {folder.quarantine_path})")
    fingerprint = data_fingerprint(prepared.data.ids, prepared.data.table.labels, len(prepared.data.bad))
    folder.confirm_same_data(fingerprint)
    if dist.is_main:
        write_run_description(out, config, prepared)
        folder.write_data_fingerprint(fingerprint)
    if teacher is not None:  # after split.json, which lists the labelled split only
        _teach(config, prepared, teacher, log)
    return run_epochs(config, out, prepared, resume=(folder_status == "resume"), log=log, clock=clock)


def _teach(config: TrainConfig, prepared: Prepared, teacher, log: Callable[[str], None]) -> None:
    """The teacher's targets for the training images (train/distill.py) and, with --unlabelled,
    the pseudo-labelled images appended to the training set (train/pseudo.py); both in run.json."""
    data = prepared.data
    prepared.train_targets, record = teacher_targets(config, teacher, data, prepared.train_idx, prepared.val_idx)
    prepared.extra["teacher"] = record
    log(f"teacher {config.teacher}: validation accuracy {record['student_val_acc']}, agrees with the labels "
        f"on {record['train_agreement']:.2%} of the training images ({record['seconds']:.1f}s)")
    if not config.unlabelled:
        return
    extra, targets, top, pseudo = pseudo_labels(config, teacher, data, prepared.train_idx, prepared.val_idx)
    first_new = len(data.source)
    prepared.data = dataclasses.replace(data, source=ConcatSource([data.source, extra]),
                                        targets=torch.cat([data.targets, top]))
    prepared.train_idx = torch.cat([prepared.train_idx, torch.arange(first_new, first_new + len(extra))])
    prepared.train_targets = torch.cat([prepared.train_targets, targets])
    prepared.extra["pseudo_labels"] = pseudo
    log(f"pseudo-labels: {pseudo['kept']} of {pseudo['candidates']} unlabelled images reach "
        f"{config.pseudo_threshold} teacher confidence and join training ({pseudo['targets']} targets; "
        f"{pseudo['left_out_labelled_files'] + pseudo['left_out_validation_copies']} left out as the run's own images)")


@dataclass
class TrainState:
    """A run's counters: what the checkpoint keeps at each epoch boundary, under these names."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    total_epochs: int | None = None  # the plan; a time budget may lower it
    best_acc: float = -1.0
    best_epoch: int = -1  # 0-based; -1 before the first epoch
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    head_probe: dict | None = None

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "total_epochs": self.total_epochs,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "elapsed_s": self.elapsed_s,
                "history": json.dumps(self.history), "head_probe": json.dumps(self.head_probe)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        counters = {k: saved[k] for k in ("epoch", "step", "total_epochs", "best_acc", "best_epoch", "elapsed_s")}
        return cls(**counters, history=json.loads(saved["history"]),
                   head_probe=json.loads(saved.get("head_probe", "null")))  # absent in older checkpoints

    def end_epoch(self, record: dict, val_acc: float, step: int) -> bool:
        """Count the epoch just validated; True when it is the best so far."""
        improved = val_acc > self.best_acc or math.isnan(val_acc)
        if improved:
            self.best_acc, self.best_epoch = val_acc, self.epoch
        self.epoch, self.step = self.epoch + 1, step
        self.history.append(record)
        return improved


def _initial_state(config: TrainConfig, out: Path, prepared: Prepared, optimizer, resume: bool) -> TrainState:
    """Fresh counters, or the ones saved by the last completed epoch."""
    folder = RunFolder(out)
    state = TrainState()
    saved = folder.read_checkpoint() if resume else None
    if saved is not None:
        folder.load_checkpoint_model(prepared.model, saved)
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState.from_checkpoint(saved)
        if prepared.dist.is_main:
            _repair_best_model(out, saved, prepared.model)
    if prepared.dist.is_main:
        folder.write_metrics(state.history)
    return state


def _repair_best_model(out: Path, saved: dict, model: torch.nn.Module) -> None:
    """A kill between writing the checkpoint and the best model: the checkpoint holds the best weights."""
    folder = RunFolder(out)
    if saved["best_epoch"] == saved["epoch"] - 1 and folder.model_epoch() != str(saved["best_epoch"]):
        folder.save_model(model, saved["best_epoch"])


class _Epochs:
    """What an epoch trains and validates on; the loop picks images or cached features once."""

    augmentation: dict | None = None  # what the training images go through, for run.json

    def __init__(self, config: TrainConfig, prepared: Prepared):
        self.config, self.prepared = config, prepared
        n_train = len(prepared.train_idx)
        self.drop_last = n_train > config.batch_size  # a ragged last batch only when one batch is all there is
        self.steps_per_epoch = num_batches(n_train, config.batch_size, drop_last=self.drop_last)

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str) -> dict:
        raise NotImplementedError

    def validate(self) -> dict:
        raise NotImplementedError


class ImageEpochs(_Epochs):
    """Epochs on the images: augmentation, the strategy's BatchNorm mode, one shard per process."""

    def __init__(self, config: TrainConfig, prepared: Prepared, augment: Augment | None, bn_stats: str):
        super().__init__(config, prepared)
        self.augment = augment
        self.augmentation = asdict(augment) if augment is not None else None
        self.train_mode = partial(train_mode, bn_stats=bn_stats)

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str) -> dict:
        prepared, dist = self.prepared, self.prepared.dist
        generator = epoch_generator(self.config.seed, epoch)
        batches = dist.iterate_batches(prepared.data.images, prepared.training_targets, self.config.batch_size,
                                       shuffle=True, generator=generator, drop_last=self.drop_last,
                                       indices=prepared.train_idx)
        stats = train_one_epoch(dist.wrap(prepared.model), batches, optimizer=optimizer,
                                preprocess=prepared.preprocess, runtime=prepared.runtime,
                                generator=dist.rank_streams(generator), augment=self.augment,
                                label_smoothing=self.config.label_smoothing, on_step=on_step,
                                total=self.steps_per_epoch, desc=desc, train_mode=self.train_mode)
        return dist.after_train_epoch(prepared.model, stats)

    def validate(self) -> dict:
        prepared, dist = self.prepared, self.prepared.dist
        batches = dist.iterate_batches(prepared.data.images, prepared.data.targets, 512, indices=prepared.val_idx)
        return dist.reduce_eval(evaluate(prepared.model, batches, preprocess=prepared.preprocess,
                                         runtime=prepared.runtime))


class FeatureEpochs(_Epochs):
    """Epochs of the head alone on backbone features computed once (no augmentation applies)."""

    def __init__(self, config: TrainConfig, prepared: Prepared, cache: FeatureCache):
        super().__init__(config, prepared)
        self.cache = cache

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str) -> dict:
        config = self.config
        return train_head_epoch(self.prepared.model, self.cache, optimizer=optimizer, batch_size=config.batch_size,
                                generator=epoch_generator(config.seed, epoch), runtime=self.prepared.runtime,
                                drop_last=self.drop_last, label_smoothing=config.label_smoothing, on_step=on_step)

    def validate(self) -> dict:
        return evaluate_head(self.prepared.model, self.cache.val, self.cache.val_targets, self.prepared.runtime)


@dataclass
class _TrainingSteps:
    """The on_step hook of the training epochs: the budget's early estimate may re-plan the run,
    then the schedule sets the step's learning rate."""

    state: TrainState
    schedule: StepSchedule
    budget: BudgetPlanner
    dist: Dist

    def __call__(self) -> None:
        state = self.state
        planned = self.budget.early(state.epoch, self.schedule.step - state.step, state.elapsed_s,
                                    state.total_epochs)
        if planned is not None:
            self.replan(planned)
        self.schedule()

    def replan(self, epochs: int) -> None:
        """Timings differ per rank: rank 0's decides."""
        self.state.total_epochs = self.schedule.epochs = self.dist.same_everywhere(epochs)


def _frozen_features(prepared: Prepared) -> FeatureCache:
    """Backbone features of train + val, computed once with only the head trainable (each process
    its shard under torchrun): what the head strategy and the head probe train on."""
    freeze_backbone(prepared.model)
    data = prepared.data
    return prepared.dist.feature_cache(build_feature_cache, prepared.model, data.images, data.targets,
                                       prepared.train_idx, prepared.val_idx, preprocess=prepared.preprocess,
                                       runtime=prepared.runtime)


def _feature_cache(config: TrainConfig, prepared: Prepared, state: TrainState,
                   log: Callable[[str], None]) -> FeatureCache:
    """The head strategy's features; their time counts as training time."""
    cache = _frozen_features(prepared)
    state.elapsed_s += cache.seconds
    prepared.extra["feature_cache"] = {"seconds": round(cache.seconds, 2), "dim": cache.train.shape[1]}
    note = "" if config.augment == "none" else f"; --augment {config.augment} does not apply to cached features"
    log(f"cached {len(cache.train) + len(cache.val)} backbone features in {cache.seconds:.1f}s{note}")
    return cache


def _head_probe(config: TrainConfig, prepared: Prepared, state: TrainState, epochs: int,
                log: Callable[[str], None], clock: Callable[[], float]) -> None:
    """LP-FT's first half: the new head fitted on cached frozen features; its time counts as training."""
    start = clock()
    cache = _frozen_features(prepared)
    result = probe_head(prepared.model, cache, epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                        batch_size=config.batch_size, seed=config.seed, runtime=prepared.runtime,
                        label_smoothing=config.label_smoothing, schedule=config.schedule)
    seconds = clock() - start
    state.elapsed_s += seconds
    state.head_probe = {"epochs": epochs, "seconds": round(seconds, 2), "features_s": round(cache.seconds, 2),
                        "train_loss": round(result["loss"], 5), "val_acc": round(result["val_acc"], 5)}
    log(f"head probe: {epochs} epochs on cached features (features {cache.seconds:.1f}s), "
        f"validation accuracy {result['val_acc']:.4f}, {seconds:.1f}s in all")


def _plan_epochs(config: TrainConfig, prepared: Prepared, state: TrainState, log: Callable[[str], None],
                 clock: Callable[[], float]) -> tuple[_Epochs, TrainConfig]:
    """What the epochs train on, after the head probe where the strategy makes one, and the config
    with the strategy's automatic choices resolved (config.json keeps the request)."""
    strategy = get_strategy(config.strategy)
    augment = parse_augment(config.augment, len(prepared.train_idx), min(prepared.data.image_size))
    bn_stats = prepared.extra["bn_stats"] = strategy.bn_stats(config, len(prepared.train_idx))
    if strategy.uses_feature_cache(config):
        epochs: _Epochs = FeatureEpochs(config, prepared, _feature_cache(config, prepared, state, log))
    else:
        epochs = ImageEpochs(config, prepared, augment, bn_stats)
    probe_epochs = strategy.head_probe_epochs(config, bn_stats)
    if probe_epochs and state.epoch == 0:
        _head_probe(config, prepared, state, probe_epochs, log, clock)
    resolved = config.replace(warmup_epochs=strategy.warmup_epochs(config, probe_epochs))
    prepared.extra.update(strategy.run_record(resolved))
    prepared.extra["augmentation"] = epochs.augmentation
    return epochs, resolved


def _log_start(config: TrainConfig, prepared: Prepared, state: TrainState, log: Callable[[str], None]) -> None:
    log(f"training {config.model} on {len(prepared.train_idx)} images ({len(prepared.val_idx)} validation), "
        f"{prepared.data.classes.num_classes} classes, {count_parameters(prepared.model):,} parameters, "
        f"{prepared.runtime.device.type}, training in {prepared.runtime.precision_name(training=True)}, "
        f"inference in {prepared.runtime.precision_name()}")
    if state.epoch:
        log(f"resuming after epoch {state.epoch} of {state.total_epochs}")


def epoch_record(epoch: int, train: dict, val: dict, lr: float, seconds: float, elapsed_s: float) -> dict:
    """One line of metrics.jsonl."""
    return {"epoch": epoch + 1, "train_loss": round(train["loss"], 5), "train_acc": round(train["acc"], 5),
            "val_loss": round(val["loss"], 5), "val_acc": round(val["acc"], 5), "lr": lr,
            "images_per_s": round(train["images_per_s"], 1), "epoch_s": round(seconds, 2),
            "elapsed_s": round(elapsed_s, 2)}


def _log_epoch(record: dict, total_epochs: int, log: Callable[[str], None]) -> None:
    log(f"epoch {record['epoch']}/{total_epochs}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
        f"| {record['images_per_s']:.0f} img/s, {record['epoch_s']:.1f}s")


def run_epochs(config: TrainConfig, out: Path, prepared: Prepared, *, resume: bool,
               log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> dict:
    """The epoch loop: train, validate, keep the best weights, checkpoint, honour the budget."""
    optimizer = build_optimizer(param_groups_for(prepared.model, config), config.weight_decay)
    state = _initial_state(config, out, prepared, optimizer, resume)
    epochs, resolved = _plan_epochs(config, prepared, state, log, clock)
    state.total_epochs = state.total_epochs or config.epochs
    budget = BudgetPlanner(config.time_budget_s, config.epochs,
                           get_strategy(config.strategy).first_representative_epoch(resolved),
                           epochs.steps_per_epoch, len(prepared.train_idx), len(prepared.val_idx), clock)
    steps = _TrainingSteps(state, StepSchedule(optimizer, config.schedule, epochs.steps_per_epoch,
                                               state.total_epochs, state.step), budget, prepared.dist)
    _log_start(config, prepared, state, log)
    try:
        while state.epoch < state.total_epochs:
            epoch, start = state.epoch, clock()
            torch.manual_seed(config.seed * 1000 + epoch)  # dropout etc.: same stream on resume
            apply_epoch(prepared.model, resolved, epoch)  # finetune: head-only warm-up epochs
            train = epochs.train_epoch(epoch, optimizer, steps, desc=f"epoch {epoch + 1}/{state.total_epochs}")
            val = epochs.validate()
            seconds = clock() - start
            state.elapsed_s += seconds
            record = epoch_record(epoch, train, val, optimizer.param_groups[0]["lr"], seconds, state.elapsed_s)
            steps.replan(budget.after_epoch(epoch, state.elapsed_s, state.total_epochs, seconds))
            improved = state.end_epoch(record, val["acc"], steps.schedule.step)
            if prepared.dist.is_main:
                save_epoch(out, prepared, optimizer, state, improved)
            _log_epoch(record, state.total_epochs, log)
    except KeyboardInterrupt:
        done = f"epochs 1-{state.epoch} are saved in {out}" if state.epoch else "no epoch had finished"
        log(f"\ninterrupted: {done}; run the same command again (or add --resume) to continue "
            f"from epoch {state.epoch + 1}")
        raise
    return finish_run(config, out, prepared, state)


def save_epoch(out: Path, prepared: Prepared, optimizer, state: TrainState, improved: bool) -> None:
    """Checkpoint first, then the best model, then metrics: see _repair_best_model for why."""
    folder = RunFolder(out)
    folder.save_checkpoint({
        "model": prepared.model.state_dict(), "optimizer": optimizer.state_dict(), **state.to_checkpoint()})
    if improved:
        folder.save_model(prepared.model, state.best_epoch)
    folder.append_metrics(state.history[-1])


def finish_run(config: TrainConfig, out: Path, prepared: Prepared, state: TrainState) -> dict:
    """Write run.json (status complete) describing the model, data and result."""
    history = state.history
    run = {
        "status": "complete", "config_hash": config.hash(), "model": prepared.model_info,
        "classes": prepared.data.classes.num_classes,
        "data": {"dir": str(config.data_dir), "images": len(prepared.data.images),
                 "train": len(prepared.train_idx), "val": len(prepared.val_idx),
                 "quarantined": len(prepared.data.bad)},
        "parameters": count_parameters(prepared.model),
        "trainable_parameters": count_parameters(prepared.model, trainable_only=True),
        "epochs": state.epoch, "best_epoch": state.best_epoch + 1,
        "best_val_acc": state.best_acc, "train_seconds": round(state.elapsed_s, 2),
        "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1) if history else None,
        "device": prepared.runtime.device.type, "precision": prepared.runtime.precision_name(training=True),
        "inference_precision": prepared.runtime.precision_name(),
        "head_probe": state.head_probe,
        **prepared.extra,
    }
    if prepared.dist.is_main:
        RunFolder(out).write_run(run)
    return run
