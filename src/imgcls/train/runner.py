"""fit(): from a config to a finished, self-describing run folder (resumable at any step)."""

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
from imgcls.config import LR_AUTO, TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import epoch_generator, num_batches
from imgcls.data.source import ConcatSource
from imgcls.data.split import per_class_subset, stratified_split
from imgcls.data.transforms import Augment, Preprocess, parse_augment
from imgcls.errors import DataError, OptionError, RunFolderError
from imgcls.models import create_model, get_spec
from imgcls.models.freeze import train_mode
from imgcls.models.weights import load_pretrained
from imgcls.runtime import Runtime, compile_or_eager, keep_depthwise_convs_in_fp32, make_runtime
from imgcls.train.auto import loss_warning, resolve_sizes, validation_per_class
from imgcls.train.budget import PACED_FLOOR, BudgetPlanner, Deadline, PacedStop
from imgcls.train.distill import check_distillation, load_teacher, other_labelled_subsets, teacher_targets
from imgcls.train.pseudo import pseudo_labels
from imgcls.train.distributed import Dist, init_distributed
from imgcls.train.ema import WeightEMA, make_ema
from imgcls.train.features import (FeatureCache, build_feature_cache, evaluate_head, probe_head,
                                   train_head_epoch)
from imgcls.train.inputs import resolve_preprocess
from imgcls.train.interrupts import HeldInterrupts
from imgcls.train.loop import EpochPosition, evaluate, train_one_epoch
from imgcls.train.lr_find import LrFinding, run_range_test
from imgcls.train.optim import StepSchedule, build_optimizer, count_parameters
from imgcls.train.run_folder import RunFolder, data_fingerprint
from imgcls.train.tracking import Tracker, open_tracker
from imgcls.train.validation import beats, marks_of, stratified_order, validate_paced
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
    ema: WeightEMA | None = None  # the weight average that validates and is kept, when on

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What validation scores and the best model saves: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.model
    request: TrainConfig | None = None  # the config as asked for, before auto choices were resolved
    train_targets: torch.Tensor | None = None  # distillation: soft targets per row (else the labels)

    @property
    def training_targets(self) -> torch.Tensor:
        return self.data.targets if self.train_targets is None else self.train_targets


def prepare(config: TrainConfig, device: str = "auto") -> Prepared:
    """Load data, split it, build model and preprocessing."""
    check_strategy(config)  # before the data load: a bad combination fails at once
    if config.teacher or config.unlabelled or config.teacher_tta != "none":
        check_distillation(config)
    data = load_dataset(config.data_dir, on_bad=config.on_bad_image, csv_path=config.csv,
                        id_column=config.id_column, label_column=config.label_column, resize=config.resize,
                        input_side=config.image_size or get_spec(config.model).default_image_size)
    if data.classes.num_classes < 2:
        raise DataError(f"{data.table.source}: only one class ({data.classes.labels[0]!r}); "
                        f"a classifier needs at least two")
    train_np, val_np = stratified_split(data.targets.numpy(), config.val_fraction, config.seed)
    if config.per_class:  # validation sized to the subset, not to the whole pool
        targets = data.targets.numpy()
        train_np = train_np[per_class_subset(targets[train_np], config.per_class, config.seed)]
        val_per_class = validation_per_class(config.per_class, config.val_fraction)
        val_np = val_np[per_class_subset(targets[val_np], val_per_class, config.seed)]
    train_idx, val_idx = torch.from_numpy(train_np), torch.from_numpy(val_np)
    preprocess, info = resolve_preprocess(config, data, train_idx)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.classes.num_classes, in_chans=info["in_chans"])
    fit_to_training_images(model, data, train_idx, preprocess, config.seed)
    extra = {"strategy": config.strategy}
    if "recipe" in get_spec(config.model).extra:  # the model's recipe choices, for run.json
        extra["recipe"] = get_spec(config.model).extra["recipe"]
    if config.pretrained or config.weights:
        extra["weights"] = load_pretrained(model, get_spec(config.model), config.weights)
    runtime = make_runtime(device, config.precision, config.channels_last, model=model)
    if runtime.depthwise_fp32:
        keep_depthwise_convs_in_fp32(model)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(data, train_idx, val_idx, model, preprocess, runtime, info, extra)


# Training images a model's data-derived layers (a whitening layer's filters) are computed from.
FIT_SAMPLE = 5000


def fit_to_training_images(model: torch.nn.Module, data: Dataset, train_idx: torch.Tensor,
                           preprocess: Preprocess, seed: int) -> None:
    """Layers computed from the data before training (ScratchCNN.fit_to_data), on a seeded sample of
    the training images: a resumed run's checkpoint then overwrites them with the same values."""
    if not hasattr(model, "fit_to_data"):
        return
    sample = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))[:FIT_SAMPLE]
    model.fit_to_data(preprocess(data.source.gather(train_idx[sample])))


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
        clock: Callable[[], float] = time.perf_counter, started: float | None = None) -> dict:
    """Train (or resume, or report an already complete run) and return run.json's content.

    `resume` only continues: it refuses a folder with no run in it (a mistyped --out would
    otherwise start a new run from scratch). `clock` times the run for the time budget, which
    counts everything the caller waits for: from `started` on that clock (the CLI passes its
    process's start) or else from this call, to run.json."""
    if resume and overwrite:
        raise OptionError("--resume continues the run in --out and --overwrite replaces it: choose one")
    deadline = Deadline(config.time_budget_s, clock=clock, start=started)
    if started is not None:
        deadline.counted_from = "the command's start"
        deadline.mark("startup")  # the interpreter and its imports, before this call
    out = Path(out)
    folder = RunFolder(out)
    dist = init_distributed(device)  # a single process unless started by torchrun
    log = log if dist.is_main else (lambda line: None)
    if asks_the_advisor(config):  # advisor runs once (rank 0); evidence goes into config.json
        config = dist.from_main(lambda: resolve_auto(config, out, log, device))
        deadline.mark("advisor")
    folder_status = dist.from_main(lambda: folder.prepare(config, overwrite))
    if resume and folder_status == "new":
        raise RunFolderError(f"{out}: no run to resume (the folder is missing or empty); "
                             f"drop --resume to start one")
    if folder_status == "complete":
        log(f"{out}: run already complete (use --overwrite to train again)")
        return folder.read_run()
    deadline.mark("run folder")
    for line in preflight_warnings(config.data_dir, config.id_column, config.label_column, csv_path=config.csv):
        log(f"warning: {line}")
    deadline.mark("preflight")
    with dist.main_first():  # rank 0 builds the decode cache, the others read it
        # Bad rows are listed and stop the run here.
        prepared = prepare(config, str(dist.device) if dist.enabled else device)
    deadline.mark("data")
    prepared.dist, prepared.request = dist, config
    # A teacher of other classes is refused before anything is written.
    teacher = load_teacher(config, prepared.data, str(dist.device) if dist.enabled else device, log=log,
                           prefer_onnx=not dist.enabled) if config.teacher else None
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
        deadline.mark("teacher")
    resolved = resolve_auto_choices(config, prepared, log)  # sized to every training image, pseudo-labelled too
    deadline.mark("data")
    return run_epochs(resolved, out, prepared, resume=(folder_status == "resume"), log=log, deadline=deadline)


def resolve_auto_choices(config: TrainConfig, prepared: Prepared, log: Callable[[str], None]) -> TrainConfig:
    """Batch size, epochs and learning rate left to auto, sized to the training images; run.json
    records the values used, config.json keeps the request."""
    resolved = resolve_sizes(config, len(prepared.train_idx))
    prepared.dist.check_batch_size(resolved.batch_size)
    if resolved.lr == LR_AUTO:
        finding = prepared.dist.from_main(lambda: range_test(resolved, prepared))
        fallback = TrainConfig.__dataclass_fields__["lr"].default
        resolved = resolved.replace(lr=finding.suggestion or fallback)
        prepared.extra["lr_find"] = finding.to_json()
        found = f"suggests {finding.suggestion:.3g}" if finding.suggestion else f"found no rate; using {fallback:g}"
        log(f"learning-rate range test: {len(finding.lrs)} steps, {found}")
    prepared.extra["resolved"] = {"batch_size": resolved.batch_size, "epochs": resolved.epochs,
                                  "lr": resolved.lr}
    return resolved


def range_test(config: TrainConfig, prepared: Prepared) -> LrFinding:
    """The learning-rate range test of the prepared run (`config` with its sizes resolved)."""
    return run_range_test(config, prepared.model, prepared.data, prepared.train_idx, prepared.preprocess,
                          prepared.runtime)


def _teach(config: TrainConfig, prepared: Prepared, teacher, log: Callable[[str], None]) -> None:
    """The teacher's targets for the training images (train/distill.py) and, with --unlabelled,
    the pseudo-labelled images appended to the training set (train/pseudo.py); both in run.json."""
    data = prepared.data
    for line in other_labelled_subsets(config):
        log(f"warning: {line}")
    prepared.train_targets, record = teacher_targets(config, teacher, data, prepared.train_idx, prepared.val_idx)
    prepared.extra["teacher"] = record
    val_acc = record["student_val_acc"]
    on_val = f"{val_acc:.2%} on the validation split" if val_acc is not None else "no validation split to score it"
    log(f"teacher {config.teacher}: {on_val}, agrees with the labels "
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
    """A run's counters: what the checkpoint keeps, under these names. A checkpoint written inside
    an epoch also holds the position there; one without it (older runs too) is at an epoch boundary."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken by the completed epochs
    total_epochs: int | None = None  # the plan; a time budget may lower it
    total_steps: int | None = None  # the plan in optimizer steps: a budget may end it inside an epoch
    schedule_anchor: list | None = None  # [step, progress] where the latest plan took the schedule over
    best_acc: float = -1.0
    best_epoch: int = -1  # 0-based; -1 before the first epoch
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    head_probe: dict | None = None
    position: EpochPosition | None = None  # how far epoch `epoch` got, when stopped inside it
    feature_rows: int | None = None  # the head strategy's FeatureCache.seeded_rows, redone on resume
    budget_stop: bool = False  # the budget ended the run inside an epoch
    best_marks: torch.Tensor | None = None  # which validation images the best model got right (validation.py)
    phases: dict = field(default_factory=dict)  # the budget clock's seconds by phase, every session's
    earlier_phases: dict = field(default_factory=dict)  # those of the sessions before this one
    probe_marks: torch.Tensor | None = None  # the head probe's marks, this session only

    @property
    def steps_in_epoch(self) -> int:
        return self.position.steps if self.position is not None else 0

    def to_checkpoint(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "total_epochs": self.total_epochs,
                "total_steps": self.total_steps, "schedule_anchor": self.schedule_anchor,
                "best_acc": self.best_acc, "best_epoch": self.best_epoch, "elapsed_s": self.elapsed_s,
                "history": json.dumps(self.history), "head_probe": json.dumps(self.head_probe),
                "position": self.position.to_checkpoint() if self.position is not None else None,
                "feature_rows": self.feature_rows, "budget_stop": self.budget_stop,
                "best_marks": self.best_marks, "phases": json.dumps(self.phases)}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        counters = {k: saved[k] for k in ("epoch", "step", "total_epochs", "best_acc", "best_epoch", "elapsed_s")}
        position = saved.get("position")  # absent in older checkpoints, like the keys after it
        phases = json.loads(saved.get("phases", "{}"))
        return cls(**counters, total_steps=saved.get("total_steps"), schedule_anchor=saved.get("schedule_anchor"),
                   history=json.loads(saved["history"]),
                   head_probe=json.loads(saved.get("head_probe", "null")),
                   position=EpochPosition.from_checkpoint(position) if position is not None else None,
                   feature_rows=saved.get("feature_rows"), budget_stop=saved.get("budget_stop", False),
                   best_marks=saved.get("best_marks"), phases=phases, earlier_phases=dict(phases))

    def end_epoch(self, record: dict, val: dict, step: int) -> bool:
        """Count the epoch just validated; True when it is the best so far (compared on the
        validation images it shares with the best: a cut pass validates a subset)."""
        improved = beats(val.get("marks"), val["acc"], self.best_marks, self.best_acc)
        if improved:
            self.best_acc, self.best_epoch, self.best_marks = val["acc"], self.epoch, val.get("marks")
        self.epoch, self.step, self.position = self.epoch + 1, step, None
        self.history.append(record)
        return improved

    def time_from(self, deadline: Deadline) -> None:
        """The run's time so far, in all and by phase, from the budget clock."""
        self.elapsed_s = deadline.elapsed_s()
        self.phases = {k: self.earlier_phases.get(k, 0.0) + deadline.phases.get(k, 0.0)
                       for k in {**self.earlier_phases, **deadline.phases}}


def _initial_state(config: TrainConfig, out: Path, prepared: Prepared, optimizer, resume: bool) -> TrainState:
    """Fresh counters, or the ones saved by the last checkpoint (an epoch's end or a stop inside one)."""
    folder = RunFolder(out)
    state = TrainState()
    saved = folder.read_checkpoint() if resume else None
    if saved is not None:
        folder.load_checkpoint_model(prepared.model, saved)
        optimizer.load_state_dict(saved["optimizer"])
        if prepared.ema is not None and "ema" in saved:
            prepared.ema.load_state_dict(saved["ema"])
        state = TrainState.from_checkpoint(saved)
        if prepared.dist.is_main and state.position is None:
            _repair_best_model(out, saved, prepared.evaluated_model)
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
    stops_inside = False  # whether an epoch can stop at a step and continue from there
    averages_weights: bool = True  # whether an EMA of the weights follows the training steps

    def __init__(self, config: TrainConfig, prepared: Prepared, n_train: int):
        self.config, self.prepared = config, prepared
        self.drop_last = n_train > config.batch_size  # a ragged last batch only when one batch is all there is
        self.steps_per_epoch = num_batches(n_train, config.batch_size, drop_last=self.drop_last)

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str, stop: Callable[[], bool] | None = None,
                    start: EpochPosition | None = None) -> dict:
        raise NotImplementedError

    def validate(self, pace: PacedStop | None = None) -> dict:
        """Loss, accuracy and marks (validation.py) of the evaluated model; under a `pace` the pass
        may be cut to a stratified subset ("images" then says how many it validated)."""
        raise NotImplementedError

    def compile(self, log: Callable[[str], None], clock: Callable[[], float]) -> float | None:
        """Compile the training step (--compile); the seconds it took, None where it does not apply."""
        return None


class ImageEpochs(_Epochs):
    """Epochs on the images: augmentation, the strategy's BatchNorm mode, one shard per process."""

    stops_inside = True

    def __init__(self, config: TrainConfig, prepared: Prepared, augment: Augment | None, bn_stats: str):
        super().__init__(config, prepared, len(prepared.train_idx))
        self.augment = augment
        self.augmentation = asdict(augment) if augment is not None else None
        self.train_mode = partial(train_mode, bn_stats=bn_stats)
        self.trained_model = prepared.model  # the compiled model when --compile works
        self.val_order: torch.Tensor | None = None

    def compile(self, log: Callable[[str], None], clock: Callable[[], float]) -> float:
        """Compiled now by one step's forward and backward on the first batch, so the first timed
        steps are not the compiler's; the model's weights and statistics are left as they were."""
        model, start = self.prepared.model, clock()
        first = self.prepared.train_idx[:self.config.batch_size]
        images, targets = self.prepared.data.source.gather(first), self.prepared.data.targets[first]

        def one_step(compiled: torch.nn.Module) -> None:
            kept = {k: v.clone() for k, v in model.state_dict().items()}
            x = self.prepared.preprocess(images, self.prepared.runtime.device, self.prepared.runtime.channels_last)
            self.train_mode(compiled)
            with self.prepared.runtime.autocast(training=True):
                loss = torch.nn.functional.cross_entropy(compiled(x).float(), targets.to(x.device))
            loss.backward()
            model.load_state_dict(kept)
            model.zero_grad(set_to_none=True)

        self.trained_model = compile_or_eager(model, one_step, log)
        return clock() - start

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str, stop: Callable[[], bool] | None = None,
                    start: EpochPosition | None = None) -> dict:
        prepared, dist = self.prepared, self.prepared.dist
        generator = epoch_generator(self.config.seed, epoch)
        batches = dist.iterate_batches(prepared.data.source, prepared.training_targets, self.config.batch_size,
                                       shuffle=True, generator=generator, drop_last=self.drop_last,
                                       indices=prepared.train_idx, skip=start.steps if start else 0)
        stats = train_one_epoch(dist.wrap(self.trained_model), batches, optimizer=optimizer,
                                preprocess=prepared.preprocess, runtime=prepared.runtime,
                                generator=dist.rank_streams(generator), augment=self.augment,
                                label_smoothing=self.config.label_smoothing, on_step=on_step,
                                total=self.steps_per_epoch, desc=desc, train_mode=self.train_mode,
                                stop=stop, start=start,
                                after_step=prepared.ema.update if prepared.ema is not None else None)
        return dist.after_train_epoch(prepared.model, stats)

    def validate(self, pace: PacedStop | None = None) -> dict:
        prepared, dist = self.prepared, self.prepared.dist
        if pace is not None:
            if self.val_order is None:  # one order for the whole run: cut passes share their prefixes
                self.val_order = stratified_order(prepared.data.targets[prepared.val_idx], self.config.seed)
            return validate_paced(prepared.evaluated_model, prepared.data.source, prepared.data.targets,
                                  prepared.val_idx, self.val_order, preprocess=prepared.preprocess,
                                  runtime=prepared.runtime, pace=pace)
        batches = dist.iterate_batches(prepared.data.source, prepared.data.targets, 512, indices=prepared.val_idx)
        result = dist.reduce_eval(evaluate(prepared.evaluated_model, batches, preprocess=prepared.preprocess,
                                           runtime=prepared.runtime))
        if not dist.enabled:  # a rank's logits cover its shard only: accuracies compare then
            result["marks"] = marks_of(result["logits"], prepared.data.targets[prepared.val_idx], None,
                                       len(prepared.val_idx))
        return result


class FeatureEpochs(_Epochs):
    """Epochs of the head alone on backbone features computed once (no augmentation applies).
    They cost milliseconds: the budget and an interrupt stop them at epoch boundaries."""

    averages_weights = False  # a linear head on fixed features: nothing noisy to average out

    def __init__(self, config: TrainConfig, prepared: Prepared, cache: FeatureCache):
        super().__init__(config, prepared, len(cache.train))  # a budget may have cut the features
        self.cache = cache

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, on_step: Callable[[], None],
                    desc: str, stop: Callable[[], bool] | None = None,
                    start: EpochPosition | None = None) -> dict:
        config = self.config
        return train_head_epoch(self.prepared.model, self.cache, optimizer=optimizer, batch_size=config.batch_size,
                                generator=epoch_generator(config.seed, epoch), runtime=self.prepared.runtime,
                                drop_last=self.drop_last, label_smoothing=config.label_smoothing, on_step=on_step)

    def validate(self, pace: PacedStop | None = None) -> dict:
        """All the cached validation features, whatever the pace: a pass costs milliseconds."""
        result = evaluate_head(self.prepared.model, self.cache.val, self.cache.val_targets, self.prepared.runtime)
        return {**result, "marks": cache_marks(result["logits"], self.cache, len(self.prepared.val_idx))}


def cache_marks(logits: torch.Tensor, cache: FeatureCache, n_val: int) -> torch.Tensor:
    """The marks of a pass over cached validation features (a deadline may have sampled them)."""
    return marks_of(logits, cache.val_targets, cache.val_rows, n_val)


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
                                    state.total_steps)
        if planned is not None:
            self.replan(planned)
        self.schedule()

    def replan(self, steps: int) -> None:
        """Timings differ per rank: rank 0's decides."""
        self.state.total_steps = self.schedule.total_steps = self.dist.same_everywhere(steps)
        self.state.total_epochs = self.schedule.epochs
        self.state.schedule_anchor = list(self.schedule.anchor)


# The head strategy's feature pass may take this share of the budget left: the epochs on its
# features cost milliseconds each and get the rest.
FEATURE_SHARE = 0.9
# LP-FT's head probe (its feature pass, then its epochs) may take this share of the budget left;
# the fine-tuning it prepares gets the rest.
PROBE_SHARE = 0.5


def _frozen_features(prepared: Prepared, seed: int, deadline: Deadline | None,
                     cut_at: int | None = None) -> FeatureCache:
    """Backbone features of train + val, computed once with only the head trainable (each process
    its shard under torchrun, where no deadline applies: the ranks would cut at different points):
    what the head strategy and the head probe train on."""
    freeze_backbone(prepared.model)
    data = prepared.data
    kw = {} if prepared.dist.enabled or deadline is None else {"deadline": deadline, "cut_at": cut_at,
                                                              "seed": seed, "clock": deadline.clock}
    return prepared.dist.feature_cache(build_feature_cache, prepared.model, data.source, data.targets,
                                       prepared.train_idx, prepared.val_idx, preprocess=prepared.preprocess,
                                       runtime=prepared.runtime, **kw)


def _log_feature_cut(cache: FeatureCache, prepared: Prepared, what: str, log: Callable[[str], None]) -> None:
    if cache.left_out:
        total = cache.seeded_rows + cache.left_out
        log(f"time budget: backbone features of only {cache.seeded_rows:,} of {total:,} images fit "
            f"({cache.seconds:.1f}s); "
            f"{what} on a random {len(cache.train):,} of {len(prepared.train_idx):,} training images "
            f"and validates on {len(cache.val):,} of {len(prepared.val_idx):,}")


def _feature_cache(config: TrainConfig, prepared: Prepared, state: TrainState, deadline: Deadline,
                   log: Callable[[str], None]) -> FeatureCache:
    """The head strategy's features; their time counts as training time. A resumed run computes the
    same images' features again (the pass is cut where the first one was, not by the time left)."""
    if state.epoch > 0:  # resumed: the first pass's images, in its order
        phase = Deadline(None, clock=deadline.clock) if state.feature_rows is not None else None
    else:
        phase = deadline.within(FEATURE_SHARE) if config.time_budget_s is not None else None
    cache = _frozen_features(prepared, config.seed, phase, state.feature_rows)
    deadline.mark("features")
    state.feature_rows = cache.seeded_rows
    prepared.extra["feature_cache"] = {"seconds": round(cache.seconds, 2), "dim": cache.train.shape[1],
                                       "train_images": len(cache.train), "val_images": len(cache.val)}
    note = "" if config.augment == "none" else f"; --augment {config.augment} does not apply to cached features"
    log(f"cached {len(cache.train) + len(cache.val)} backbone features in {cache.seconds:.1f}s{note}")
    _log_feature_cut(cache, prepared, "the head trains", log)
    return cache


def _head_probe(config: TrainConfig, prepared: Prepared, state: TrainState, epochs: int, deadline: Deadline,
                log: Callable[[str], None]) -> None:
    """LP-FT's first half: the new head fitted on cached frozen features; its time counts as
    training, and under a budget it gets PROBE_SHARE of it (fewer images, fewer epochs)."""
    start = deadline.elapsed_s()
    probe = deadline.within(PROBE_SHARE) if config.time_budget_s is not None else None
    cache = _frozen_features(prepared, config.seed, probe.within(FEATURE_SHARE) if probe else None)
    _log_feature_cut(cache, prepared, "the head probe fits", log)
    result = probe_head(prepared.model, cache, epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                        batch_size=config.batch_size, seed=config.seed, runtime=prepared.runtime,
                        label_smoothing=config.label_smoothing, schedule=config.schedule, deadline=probe)
    seconds = deadline.elapsed_s() - start
    deadline.mark("head probe")
    state.probe_marks = cache_marks(result["val_logits"], cache, len(prepared.val_idx))
    state.head_probe = {"epochs": result["epochs"], "seconds": round(seconds, 2),
                        "features_s": round(cache.seconds, 2), "train_images": len(cache.train),
                        "train_loss": round(result["loss"], 5), "val_acc": round(result["val_acc"], 5),
                        "cut": result["epochs"] < epochs or bool(cache.left_out)}
    cut = f" (the time budget held {result['epochs']} of {epochs})" if result["epochs"] < epochs else ""
    log(f"head probe: {result['epochs']} epochs{cut} on cached features (features {cache.seconds:.1f}s), "
        f"validation accuracy {result['val_acc']:.4f}, {seconds:.1f}s in all")


def _probe_as_candidate(out: Path, prepared: Prepared, state: TrainState) -> None:
    """The probe's model is the first candidate for the best model: a fine-tune that only gets
    worse (too high a learning rate, too few images) then leaves the probe's weights as the result."""
    val_acc = state.head_probe["val_acc"]
    if math.isnan(val_acc):
        return  # nothing to compare with: the fine-tune epochs decide, as without a probe
    state.best_acc, state.best_epoch, state.best_marks = val_acc, -1, state.probe_marks
    if prepared.dist.is_main:
        RunFolder(out).save_model(prepared.model, state.best_epoch)


def _plan_epochs(config: TrainConfig, prepared: Prepared, state: TrainState, log: Callable[[str], None],
                 deadline: Deadline) -> tuple[_Epochs, TrainConfig]:
    """What the epochs train on, after the head probe where the strategy makes one, and the config
    with the strategy's automatic choices resolved (config.json keeps the request)."""
    strategy = get_strategy(config.strategy)
    augment = parse_augment(config.augment, len(prepared.train_idx), min(prepared.data.image_size))
    bn_stats = prepared.extra["bn_stats"] = strategy.bn_stats(config, len(prepared.train_idx))
    if strategy.uses_feature_cache(config):
        epochs: _Epochs = FeatureEpochs(config, prepared, _feature_cache(config, prepared, state, deadline, log))
    else:
        epochs = ImageEpochs(config, prepared, augment, bn_stats)
    probe_epochs = strategy.head_probe_epochs(config, bn_stats)
    if probe_epochs and state.epoch == 0 and state.position is None:  # a checkpoint holds the probed head
        _head_probe(config, prepared, state, probe_epochs, deadline, log)
    state.time_from(deadline)
    resolved = config.replace(warmup_epochs=strategy.warmup_epochs(config, probe_epochs))
    prepared.extra.update(strategy.run_record(resolved))
    prepared.extra["augmentation"] = epochs.augmentation
    return epochs, resolved


def _log_start(config: TrainConfig, prepared: Prepared, state: TrainState, steps_per_epoch: int,
               log: Callable[[str], None]) -> None:
    log(f"training {config.model} on {len(prepared.train_idx)} images ({len(prepared.val_idx)} validation), "
        f"batch {config.batch_size}, {config.epochs} epochs at most, "
        f"{prepared.data.classes.num_classes} classes, {count_parameters(prepared.model):,} parameters, "
        f"{prepared.runtime.device.type}, training in {prepared.runtime.precision_name(training=True)}, "
        f"inference in {prepared.runtime.precision_name()}")
    if state.position is not None:
        log(f"resuming at step {state.position.steps + 1} of {steps_per_epoch} of epoch {state.epoch + 1} "
            f"of {state.total_epochs}")
    elif state.epoch:
        log(f"resuming after epoch {state.epoch} of {state.total_epochs}")


def epoch_record(epoch: int, train: dict, val: dict, lr: float, seconds: float, elapsed_s: float) -> dict:
    """One line of metrics.jsonl."""
    return {"epoch": epoch + 1, "train_loss": round(train["loss"], 5), "train_acc": round(train["acc"], 5),
            "val_loss": round(val["loss"], 5), "val_acc": round(val["acc"], 5), "lr": lr,
            "images_per_s": round(train["images_per_s"], 1), "epoch_s": round(seconds, 2),
            "elapsed_s": round(elapsed_s, 2)}


def _log_epoch(record: dict, total_epochs: int, log: Callable[[str], None], steps_per_epoch: int) -> None:
    stopped = (f" (the time budget ended it after {record['stopped_at_step']} of {steps_per_epoch} steps)"
               if "stopped_at_step" in record else "")
    validated = (f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}"
                 if math.isfinite(record["val_acc"]) else
                 "not validated: no time left in the budget" if "val_images" in record else "no validation split")
    log(f"epoch {record['epoch']}/{total_epochs}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.4f} | {validated} "
        f"| {record['images_per_s']:.0f} img/s, {record['epoch_s']:.1f}s{stopped}")


# A budgeted run's steps keep time for a validation pass of at most this share of the budget: the
# whole split when that costs less, else the stratified subset the share holds (validation.py).
VALIDATION_SHARE = 0.25


class _StepStop:
    """train_one_epoch's stop hook: a held Ctrl-C / SIGTERM, or a budget whose next step would not
    end in time together with what must follow it: the validation (at most VALIDATION_SHARE of the
    budget) and the saving. The budget never stops a run before its first step: one spent before
    training (a slow data load) still ends with a model."""

    def __init__(self, interrupts: HeldInterrupts, deadline: Deadline, budgeted: bool, n_val: int, batch_size: int,
                 steps_taken: Callable[[], int], steps_planned: Callable[[], int]):
        self.interrupts, self.steps_taken, self.steps_planned = interrupts, steps_taken, steps_planned
        self.n_val, self.batch_size, self.budget_s = n_val, batch_size, deadline.budget_s
        self.save_s = 0.0  # what the last save (checkpoint, best model, metrics) cost
        self.pace = PacedStop(deadline, self.reserve_s) if budgeted else None
        # The validation passes' pace, measured pass after pass and handed on to the next.
        self.validation = PacedStop(deadline, lambda: self.save_s, prior_s=self.forward_prior_s) if budgeted else None

    def forward_prior_s(self) -> float:
        """Before any validation is measured: a forward pass costs about a third of a training step per image."""
        return self.pace.unit_cost_s() / self.batch_size / 3

    def reserve_s(self) -> float:
        per_image = self.validation.item_cost_s()
        share = max(VALIDATION_SHARE * self.budget_s, PACED_FLOOR * per_image)
        return min(per_image * self.n_val, share) + self.save_s

    def __call__(self) -> bool:
        if self.steps_taken() >= self.steps_planned():  # the plan ends inside this epoch
            return True
        return self.interrupts() or (self.pace is not None and self.pace() and self.steps_taken() > 0)


class _EpochLoop:
    """The epochs of one session: train, validate, keep the best weights, checkpoint, honour the
    budget (which may end the run at a step) and interrupts (saved at the step they stop)."""

    def __init__(self, config: TrainConfig, resolved: TrainConfig, out: Path, prepared: Prepared,
                 epochs: _Epochs, optimizer, state: TrainState, deadline: Deadline, log: Callable[[str], None],
                 tracker: Tracker):
        self.config, self.resolved, self.out, self.prepared = config, resolved, out, prepared
        self.epochs, self.optimizer, self.state, self.deadline, self.log = epochs, optimizer, state, deadline, log
        self.tracker, self.warned = tracker, False
        self.budget = BudgetPlanner(config.time_budget_s, config.epochs,
                                    get_strategy(config.strategy).first_representative_epoch(resolved),
                                    epochs.steps_per_epoch, len(prepared.train_idx), len(prepared.val_idx),
                                    deadline.clock, whole_epochs=not epochs.stops_inside or prepared.dist.enabled)
        state.total_steps = state.total_steps or state.total_epochs * epochs.steps_per_epoch
        schedule = StepSchedule(optimizer, config.schedule, epochs.steps_per_epoch, state.total_epochs,
                                state.step + state.steps_in_epoch, total_steps=state.total_steps,
                                anchor=state.schedule_anchor)
        self.steps = _TrainingSteps(state, schedule, self.budget, prepared.dist)
        self.interrupts = HeldInterrupts(enabled=not prepared.dist.enabled)
        # Under torchrun the ranks' clocks differ, and they must stop at the same step: epoch boundaries only.
        budgeted = config.time_budget_s is not None and epochs.stops_inside and not prepared.dist.enabled
        self.stop = _StepStop(self.interrupts, deadline, budgeted, len(prepared.val_idx), config.batch_size,
                              lambda: schedule.step, lambda: schedule.total_steps)

    def run(self) -> None:
        state = self.state
        try:
            with self.interrupts:
                while state.epoch < state.total_epochs and self.one_epoch():
                    self.interrupts.deliver()  # one that came while validating or between steps
        except KeyboardInterrupt:
            self.log(f"\ninterrupted: {self.saved_so_far()} in {self.out}; run the same command again "
                     f"(or add --resume) to continue from {self.resume_point()}")
            raise
        state.time_from(self.deadline)

    def one_epoch(self) -> bool:
        """Train and validate one epoch (or its rest); False once the budget ended the run."""
        state, epoch, config = self.state, self.state.epoch, self.config
        start = self.deadline.elapsed_s()
        torch.manual_seed(config.seed * 1000 + epoch)  # dropout etc.: same stream on resume
        apply_epoch(self.prepared.model, self.resolved, epoch)  # finetune: head-only warm-up epochs
        train = self.epochs.train_epoch(epoch, self.optimizer, self.steps, stop=self.stop, start=state.position,
                                        desc=f"epoch {epoch + 1}/{state.total_epochs}")
        self.deadline.mark("training")
        stopped = train.get("stopped", False)
        if stopped and self.interrupts.pending:
            self.save_position(train["position"])
            self.interrupts.deliver()
        if stopped and train["position"].steps == 0:  # the budget ran out at an epoch boundary
            state.total_epochs, state.budget_stop = state.epoch, True
            return False
        val = self.epochs.validate(self.stop.validation)
        self.deadline.mark("validation")
        state.time_from(self.deadline)
        seconds = state.elapsed_s - start
        record = epoch_record(epoch, train, val, self.optimizer.param_groups[0]["lr"], seconds, state.elapsed_s)
        if val.get("images", len(self.prepared.val_idx)) < len(self.prepared.val_idx):
            record["val_images"] = val["images"]  # the budget cut the pass to a stratified subset
        if stopped:
            record["stopped_at_step"] = train["position"].steps
        else:
            self.steps.replan(self.budget.after_epoch(epoch, state.elapsed_s, state.total_steps, seconds))
        improved = state.end_epoch(record, val, self.steps.schedule.step)
        if stopped:
            state.total_epochs, state.budget_stop = state.epoch, True
        if self.prepared.dist.is_main:
            save_epoch(self.out, self.prepared, self.optimizer, state, improved)
            self.tracker.log_epoch(record)
        self.stop.save_s = self.deadline.mark("saving")
        _log_epoch(record, state.total_epochs, self.log, self.epochs.steps_per_epoch)
        self.warned = self.warned or _warn_if_above_chance(record, self.prepared.data.classes.num_classes, self.log)
        return not stopped

    def save_position(self, position: EpochPosition) -> None:
        """The checkpoint of an epoch stopped at a step; metrics and the best model stay as they are."""
        self.state.position = position
        self.state.time_from(self.deadline)
        if self.prepared.dist.is_main:
            save_checkpoint(self.out, self.prepared, self.optimizer, self.state)
        self.deadline.mark("saving")

    def saved_so_far(self) -> str:
        state = self.state
        epochs = f"epochs 1-{state.epoch}" if state.epoch else ""
        if state.position is None:
            return f"{epochs} are saved" if epochs else "no epoch had finished"
        inside = f"step {state.position.steps} of {self.epochs.steps_per_epoch} of epoch {state.epoch + 1}"
        return f"{epochs} and {inside} are saved" if epochs else f"{inside} is saved"

    def resume_point(self) -> str:
        state = self.state
        return f"epoch {state.epoch + 1}" + (f" step {state.position.steps + 1}" if state.position else "")


def _warn_if_above_chance(record: dict, num_classes: int, log: Callable[[str], None]) -> bool:
    """One line when an epoch after the first trained above chance loss; True once it has said so.
    The first epoch is spared: from a random start its average may sit just above ln C."""
    line = loss_warning(record["train_loss"], num_classes) if record["epoch"] > 1 else None
    if line is not None:
        log(f"warning: epoch {record['epoch']}: {line}")
    return line is not None


def run_epochs(config: TrainConfig, out: Path, prepared: Prepared, *, resume: bool,
               log: Callable[[str], None] = print, deadline: Deadline | None = None) -> dict:
    """The epoch loop after the feature pass and head probe where there are any, on the budget
    clock of `deadline` (by default one that starts now); a resumed run's earlier time counts too."""
    deadline = deadline or Deadline(config.time_budget_s)
    tracker = open_tracker(config.tracking, out) if prepared.dist.is_main else Tracker()  # a missing extra: now
    optimizer = build_optimizer(param_groups_for(prepared.model, config), config.weight_decay)
    prepared.ema = make_ema(prepared.model, resolved_ema_decay(config))
    state = _initial_state(config, out, prepared, optimizer, resume)
    deadline.add_spent(state.elapsed_s)
    deadline.mark("setup")
    epochs, resolved = _plan_epochs(config, prepared, state, log, deadline)
    if state.epoch == 0 and state.head_probe is not None and state.position is None:
        _probe_as_candidate(out, prepared, state)
    _keep_ema_where_it_applies(prepared, epochs, log)
    _compile_where_asked(config, prepared, epochs, log, deadline.clock)
    deadline.mark("setup")
    state.total_epochs = state.total_epochs or config.epochs
    loop = _EpochLoop(config, resolved, out, prepared, epochs, optimizer, state, deadline, log, tracker)
    _log_start(config, prepared, state, epochs.steps_per_epoch, log)
    try:
        loop.run()
    finally:
        tracker.close()
    deadline.mark("saving")
    state.time_from(deadline)
    return finish_run(config, out, prepared, state, deadline.counted_from)


def save_checkpoint(out: Path, prepared: Prepared, optimizer, state: TrainState) -> None:
    ema = {"ema": prepared.ema.state_dict()} if prepared.ema is not None else {}
    RunFolder(out).save_checkpoint({"model": prepared.model.state_dict(), "optimizer": optimizer.state_dict(),
                                    **ema, **state.to_checkpoint()})

def resolved_ema_decay(config: TrainConfig) -> float:
    """--ema-decay, or the model's recipe when unset (None)."""
    if config.ema_decay is not None:
        return config.ema_decay
    return float(get_spec(config.model).extra.get("ema_decay", 0.0))


def _keep_ema_where_it_applies(prepared: Prepared, epochs: _Epochs, log: Callable[[str], None]) -> None:
    """Drop the average where the epochs cannot follow it, saying so; record the choice for run.json."""
    if prepared.ema is not None and not epochs.averages_weights:
        log("note: --ema-decay does not apply to a head trained on cached features; training without it")
        prepared.ema = None
    prepared.extra["ema_decay"] = prepared.ema.decay if prepared.ema is not None else 0.0


def _compile_where_asked(config: TrainConfig, prepared: Prepared, epochs: _Epochs,
                         log: Callable[[str], None], clock: Callable[[], float]) -> None:
    """--compile: the training step, compiled after the run's Deadline started, so its time counts
    as training time; run.json says whether it worked and how long it took."""
    if not config.compile:
        return
    seconds = epochs.compile(log, clock)
    if seconds is None:
        log("note: --compile does not apply to a head trained on cached features; training without it")
        prepared.extra["compile"] = {"compiled": False}
        return
    compiled = epochs.trained_model is not prepared.model
    prepared.extra["compile"] = {"compiled": compiled, "seconds": round(seconds, 2)}
    if compiled:
        log(f"compiled the training step in {seconds:.1f}s")


def save_epoch(out: Path, prepared: Prepared, optimizer, state: TrainState, improved: bool) -> None:
    """Checkpoint first, then the best model, then metrics: see _repair_best_model for why."""
    folder = RunFolder(out)
    save_checkpoint(out, prepared, optimizer, state)
    if improved:
        folder.save_model(prepared.evaluated_model, state.best_epoch)
    folder.append_metrics(state.history[-1])


def finish_run(config: TrainConfig, out: Path, prepared: Prepared, state: TrainState,
               counted_from: str = "the train call") -> dict:
    """Write run.json (status complete) describing the model, data and result."""
    history = state.history
    run = {
        "status": "complete", "config_hash": (prepared.request or config).hash(), "model": prepared.model_info,
        "classes": prepared.data.classes.num_classes,
        "data": {"dir": str(config.data_dir), "images": len(prepared.data.source),
                 "train": len(prepared.train_idx), "val": len(prepared.val_idx),
                 "quarantined": len(prepared.data.bad)},
        "parameters": count_parameters(prepared.model),
        "trainable_parameters": count_parameters(prepared.model, trainable_only=True),
        "epochs": state.epoch, "best_epoch": state.best_epoch + 1,
        "best_model": "head_probe" if state.best_epoch < 0 and state.head_probe else "epoch",
        # None where no pass validated an image, as run.json writes it (JSON has no NaN).
        "best_val_acc": state.best_acc if math.isfinite(state.best_acc) else None,
        "train_seconds": round(state.elapsed_s, 2),
        "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1) if history else None,
        "device": prepared.runtime.device.type, "precision": prepared.runtime.precision_name(training=True),
        "inference_precision": prepared.runtime.precision_name(),
        "head_probe": state.head_probe, "budget": budget_record(config, prepared, state, counted_from),
        **prepared.extra,
    }
    if prepared.dist.is_main:
        RunFolder(out).write_run(run)
    return run


def budget_record(config: TrainConfig, prepared: Prepared, state: TrainState, counted_from: str) -> dict | None:
    """run.json's account of the time budget: what its clock counts (everything from `counted_from`
    until run.json is written, by phase, every session of a resumed run), what it cut short and
    how far past the budget the run ended."""
    if config.time_budget_s is None:
        return None
    cuts = []
    if state.feature_rows is not None and state.feature_rows < len(prepared.train_idx) + len(prepared.val_idx):
        cuts.append("features")
    if state.head_probe and state.head_probe.get("cut"):
        cuts.append("head probe")
    if state.epoch < config.epochs:
        cuts.append("epochs")
    if state.budget_stop:
        cuts.append("inside an epoch")
    partial = [h["epoch"] for h in state.history if "val_images" in h]
    if partial:
        cuts.append("validation")
    over = max(state.elapsed_s - config.time_budget_s, 0.0)
    record = {"budget_s": config.time_budget_s, "seconds": round(state.elapsed_s, 2),
              "counted_from": counted_from, "phases": {k: round(v, 2) for k, v in state.phases.items()},
              "cut_short": bool(cuts), "cuts": cuts, "over_s": round(over, 2),
              "over_pct": round(100 * over / config.time_budget_s, 1)}
    if partial:
        record["validated_on_a_subset"] = partial  # epochs (1-based); metrics.jsonl gives their val_images
    return record
