"""fit(): from a config to a finished, self-describing run folder (resumable at epoch boundaries)."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls import fileio
from imgcls.check import preflight_warnings
from imgcls.config import TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import epoch_generator, num_batches
from imgcls.data.split import per_class_subset, stratified_split
from imgcls.data.transforms import Preprocess, parse_augment
from imgcls.errors import DataError, ImgclsError
from imgcls.models import create_model, get_spec
from imgcls.runtime import keep_depthwise_convs_in_fp32, make_runtime
from imgcls.train import checkpoint as ckpt
from imgcls.train.distributed import Dist, init_distributed
from imgcls.train.loop import Runtime, evaluate, train_one_epoch
from imgcls.train.optim import build_optimizer, count_parameters, lr_factor, set_lr
from imgcls.train.run_folder import (CONFIG_FILE, DATA_FILE, RUN_FILE, confirm_same_data,
                                     data_fingerprint, prepare_run_folder)
from imgcls.train.features import build_feature_cache, evaluate_head, probe_head, train_head_epoch
from imgcls.models.freeze import train_mode
from imgcls.train.strategies import (apply_epoch, asks_the_advisor, check_strategy, freeze_backbone,
                                     get_strategy, param_groups_for)

METRICS_FILE = "metrics.jsonl"


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


def resolve_preprocess(config: TrainConfig, data: Dataset, train_idx: torch.Tensor) -> tuple[Preprocess, dict]:
    """Input channels, size and normalisation for the model, and the record of it for the run."""
    spec = get_spec(config.model)
    in_chans = data.channels if spec.family == "scratch" else 3
    side = config.image_size or spec.default_image_size
    if spec.family == "timm" and not config.image_size:
        from imgcls.models.backbones import input_side
        side = input_side(spec, max(data.image_size))
    if side is not None and side < spec.min_image_size:
        raise ImgclsError(f"--image-size {side} is below {config.model}'s minimum of {spec.min_image_size} px")
    size = (side, side) if side else None
    if spec.mean is not None:
        mean, std = spec.mean, spec.std
    else:
        # Scratch models: normalise with the training split's own statistics.
        pixels = data.images[train_idx].float().div_(255)
        mean = tuple(pixels.mean(dim=(0, 1, 2)).tolist())
        std = tuple(max(s, 1e-3) for s in pixels.std(dim=(0, 1, 2)).tolist())
        if in_chans != data.channels:
            mean, std = mean * in_chans if len(mean) == 1 else mean, std * in_chans if len(std) == 1 else std
    preprocess = Preprocess(tuple(mean), tuple(std), in_chans, size)
    info = {"name": config.model, "in_chans": in_chans, "image_size": list(size) if size else None,
            "data_channels": data.channels, "data_size": list(data.image_size),
            "mean": list(mean), "std": list(std)}
    return preprocess, info


def prepare(config: TrainConfig, device: str = "auto") -> Prepared:
    """Load data, split it, build model and preprocessing."""
    check_strategy(config)  # before the data load: a bad combination fails at once
    data = load_dataset(config.data_dir, on_bad=config.on_bad_image,
                        id_column=config.id_column, label_column=config.label_column)
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
        from imgcls.models.weights import load_pretrained
        extra["weights"] = load_pretrained(model, get_spec(config.model), config.weights)
    runtime = make_runtime(device, config.precision, config.channels_last, model=model)
    if runtime.depthwise_fp32:
        keep_depthwise_convs_in_fp32(model)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Prepared(data, train_idx, val_idx, model, preprocess, runtime, info, extra)


def write_run_description(out: Path, config: TrainConfig, p: Prepared) -> None:
    """config.json, classes.json, split.json, quarantine: what predict/serve/report need."""
    fileio.write_json(out / CONFIG_FILE, config.to_json())
    fileio.write_json(out / "classes.json", {**p.data.classes.to_json(),
                                              "id_column": p.data.table.id_column,
                                              "label_column": p.data.table.label_column})
    ids = p.data.ids
    fileio.write_json(out / "split.json", {
        "seed": config.seed, "val_fraction": config.val_fraction, "per_class": config.per_class,
        "train_count": len(p.train_idx), "val_ids": [ids[i] for i in p.val_idx.tolist()]})
    if p.data.bad:
        fileio.write_json(out / "quarantine.json", p.data.bad)


def fit(config: TrainConfig, out: str | Path, *, overwrite: bool = False, device: str = "auto",
        log: Callable[[str], None] = print) -> dict:
    """Train (or resume, or report an already complete run) and return run.json's content."""
    out = Path(out)
    dist = init_distributed(device)  # a single process unless started by torchrun
    dist.check_batch_size(config.batch_size)
    log = log if dist.is_main else (lambda line: None)
    if asks_the_advisor(config):  # advisor runs once (rank 0); evidence goes into config.json
        from imgcls.advise import resolve_auto
        config = dist.from_main(lambda: resolve_auto(config, out, log, device))
    state = dist.from_main(lambda: prepare_run_folder(out, config, overwrite))
    if state == "complete":
        log(f"{out}: run already complete (use --overwrite to train again)")
        return fileio.read_json(out / RUN_FILE)
    for line in preflight_warnings(config.data_dir, config.id_column, config.label_column):
        log(f"warning: {line}")
    with dist.main_first():  # rank 0 builds the decode cache, the others read it
        p = prepare(config, str(dist.device) if dist.enabled else device)  # bad rows: listed and stopped here
    p.dist = dist
    if dist.enabled:
        p.extra["world_size"] = dist.world_size
    if p.data.bad:
        log(f"quarantined {len(p.data.bad)} bad rows or images (reasons in {out / 'quarantine.json'})")
    fingerprint = data_fingerprint(p.data.ids, p.data.table.labels, len(p.data.bad))
    confirm_same_data(out, fingerprint)
    if dist.is_main:
        write_run_description(out, config, p)
        fileio.write_json(out / DATA_FILE, fingerprint)
    return run_epochs(config, out, p, resume=(state == "resume"), log=log)


def _initial_state(config: TrainConfig, out: Path, p: Prepared, optimizer, resume: bool) -> dict:
    """Fresh counters, or the ones saved by the last completed epoch."""
    state = {"epoch": 0, "step": 0, "total_epochs": None, "best_acc": -1.0, "best_epoch": -1,
             "history": [], "elapsed_s": 0.0, "head_probe": None}
    if resume and (out / ckpt.CHECKPOINT_FILE).exists():
        saved = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_FILE)
        p.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in ("epoch", "step", "total_epochs", "best_acc",
                                             "best_epoch", "elapsed_s")})
        state["history"] = json.loads(saved["history"])
        state["head_probe"] = json.loads(saved.get("head_probe", "null"))  # absent in older checkpoints
        if p.dist.is_main:
            _repair_best_model(out, saved, p.model)
    if p.dist.is_main:
        fileio.write_text(out / METRICS_FILE, "".join(json.dumps(h) + "\n" for h in state["history"]))
    return state


def _repair_best_model(out: Path, saved: dict, model: torch.nn.Module) -> None:
    """A kill between writing the checkpoint and model.safetensors: the checkpoint holds the best weights."""
    model_file = out / ckpt.MODEL_FILE
    have = ckpt.read_metadata(model_file).get("epoch") if model_file.exists() else None
    if saved["best_epoch"] == saved["epoch"] - 1 and have != str(saved["best_epoch"]):
        ckpt.save_model(model, model_file, {"epoch": str(saved["best_epoch"])})


def fit_epochs_to_budget(config: TrainConfig, done: int, elapsed_s: float, epoch_cost_s: float) -> int:
    """How many epochs fit the time budget when `done` epochs have taken `elapsed_s`: never more
    than asked nor fewer than done."""
    if not config.time_budget_s:
        return config.epochs
    more = math.floor((config.time_budget_s - elapsed_s) / max(epoch_cost_s, 1e-6))
    return int(min(config.epochs, done + max(more, 0)))


# Steps timed before a budgeted run sizes its schedule: waiting for the end of the first epoch
# would run that epoch on a schedule planned for --epochs (the compare quick preset asks for 30
# epochs and fits about 6: its first epoch warmed up to a quarter of the peak lr, the second
# started at the peak).
EARLY_ESTIMATE_STEPS = 8


class BudgetPlanner:
    """Sizes a budgeted run's schedule after a few steps of its first representative epoch, and
    again from each epoch's measured cost. The first full epoch may correct the early estimate
    either way (the schedule is still warming up); later epochs only shrink the plan, so the
    annealing learning rate never jumps back up."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int, n_train: int, n_val: int):
        self.config = config
        self.steps_per_epoch = steps_per_epoch
        # A validation pass is forward only: about a third of a training step per image.
        self.eval_share = n_val / max(n_train, 1) / 3
        self.stamps: list[float] = []
        self.first_representative_epoch = get_strategy(config.strategy).first_representative_epoch(config)

    def representative(self, epoch: int) -> bool:
        return epoch >= self.first_representative_epoch

    def first_representative(self, epoch: int) -> bool:
        return self.representative(epoch) and not self.representative(epoch - 1)

    def early(self, epoch: int, step_in_epoch: int, state: dict, total_epochs: int) -> int | None:
        """Called before each step: after EARLY_ESTIMATE_STEPS timed steps of the first
        representative epoch, the epochs that fit (step 0 is not timed: it warms caches up).
        None at every other step; the same steps on every rank, so the caller may synchronise."""
        if (not self.config.time_budget_s or not self.first_representative(epoch)
                or self.steps_per_epoch <= EARLY_ESTIMATE_STEPS + 1):
            return None
        if 1 <= step_in_epoch <= EARLY_ESTIMATE_STEPS + 1:
            self.stamps.append(time.perf_counter())
        if step_in_epoch != EARLY_ESTIMATE_STEPS + 1 or len(self.stamps) != EARLY_ESTIMATE_STEPS + 1:
            return None
        # The median step: a pause of the machine during a few of them must not shrink the plan
        # for the whole run (the first full epoch can only correct it once that epoch is spent).
        per_step = statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        cost = per_step * self.steps_per_epoch * (1 + self.eval_share)
        return min(total_epochs, fit_epochs_to_budget(self.config, epoch + 1, state["elapsed_s"] + cost, cost))

    def after_epoch(self, epoch: int, state: dict, total_epochs: int, epoch_cost_s: float) -> int:
        """From the epoch just measured (state["elapsed_s"] already counts it)."""
        if not self.config.time_budget_s or not self.representative(epoch):
            return total_epochs
        fitted = fit_epochs_to_budget(self.config, epoch + 1, state["elapsed_s"], epoch_cost_s)
        return fitted if self.first_representative(epoch) else min(total_epochs, fitted)


def _frozen_features(config: TrainConfig, p: Prepared):
    """Backbone features of train + val, computed once with only the head trainable (each process
    its shard under torchrun): what the head strategy and the head probe train on."""
    freeze_backbone(p.model)
    return p.dist.feature_cache(build_feature_cache, p.model, p.data.images, p.data.targets, p.train_idx,
                                p.val_idx, preprocess=p.preprocess, runtime=p.runtime)


def _feature_cache(config: TrainConfig, p: Prepared, state: dict, log: Callable[[str], None]):
    """The head strategy's features; their time counts as training time."""
    cache = _frozen_features(config, p)
    state["elapsed_s"] += cache.seconds
    p.extra["feature_cache"] = {"seconds": round(cache.seconds, 2), "dim": cache.train.shape[1]}
    note = "" if config.augment == "none" else f"; --augment {config.augment} does not apply to cached features"
    log(f"cached {len(cache.train) + len(cache.val)} backbone features in {cache.seconds:.1f}s{note}")
    return cache


def _head_probe(config: TrainConfig, p: Prepared, state: dict, epochs: int, log: Callable[[str], None]) -> None:
    """LP-FT's first half: the new head fitted on cached frozen features; its time counts as training."""
    start = time.perf_counter()
    cache = _frozen_features(config, p)
    result = probe_head(p.model, cache, epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                        batch_size=config.batch_size, seed=config.seed, runtime=p.runtime,
                        label_smoothing=config.label_smoothing, schedule=config.schedule)
    seconds = time.perf_counter() - start
    state["elapsed_s"] += seconds
    state["head_probe"] = {"epochs": epochs, "seconds": round(seconds, 2), "features_s": round(cache.seconds, 2),
                           "train_loss": round(result["loss"], 5), "val_acc": round(result["val_acc"], 5)}
    log(f"head probe: {epochs} epochs on cached features (features {cache.seconds:.1f}s), "
        f"validation accuracy {result['val_acc']:.4f}, {seconds:.1f}s in all")


def run_epochs(config: TrainConfig, out: Path, p: Prepared, *, resume: bool,
               log: Callable[[str], None] = print) -> dict:
    """The epoch loop: train, validate, keep the best weights, checkpoint, honour the budget."""
    groups = param_groups_for(p.model, config)
    optimizer = build_optimizer(groups, config.weight_decay)
    state = _initial_state(config, out, p, optimizer, resume)
    augment = parse_augment(config.augment, len(p.train_idx))
    strategy = get_strategy(config.strategy)
    bn_stats = p.extra["bn_stats"] = strategy.bn_stats(config, len(p.train_idx))
    images, targets = p.data.images, p.data.targets
    cache = _feature_cache(config, p, state, log) if strategy.uses_feature_cache(config) else None
    probe_epochs = strategy.head_probe_epochs(config, bn_stats)
    if probe_epochs and state["epoch"] == 0:
        _head_probe(config, p, state, probe_epochs, log)
    # What this run does each epoch, the automatic choices resolved (config.json keeps the request).
    resolved = config.replace(warmup_epochs=strategy.warmup_epochs(config, probe_epochs))
    p.extra.update(strategy.run_record(resolved))
    # What the training images went through (shift in stored-image pixels), for run.json.
    p.extra["augmentation"] = asdict(augment) if augment is not None and cache is None else None
    drop_last = len(p.train_idx) > config.batch_size  # a ragged last batch only when one batch is all there is
    steps_per_epoch = num_batches(len(p.train_idx), config.batch_size, drop_last=drop_last)
    total_epochs = state["total_epochs"] or config.epochs
    planner = BudgetPlanner(resolved, steps_per_epoch, len(p.train_idx), len(p.val_idx))
    log(f"training {config.model} on {len(p.train_idx)} images ({len(p.val_idx)} validation), "
        f"{p.data.classes.num_classes} classes, {count_parameters(p.model):,} parameters, "
        f"{p.runtime.device.type}, training in {p.runtime.precision_name(training=True)}, "
        f"inference in {p.runtime.precision_name()}")
    if resume and state["epoch"]:
        log(f"resuming after epoch {state['epoch']} of {total_epochs}")
    try:
        while state["epoch"] < total_epochs:
            epoch = state["epoch"]
            t0 = time.perf_counter()
            torch.manual_seed(config.seed * 1000 + epoch)  # dropout etc.: same stream on resume
            generator = epoch_generator(config.seed, epoch)
            apply_epoch(p.model, resolved, epoch)  # finetune: head-only warm-up epochs
            batches = p.dist.iterate_batches(images, targets, config.batch_size, shuffle=True, generator=generator,
                                      drop_last=drop_last, indices=p.train_idx)

            epoch_first_step = state["step"]

            def on_step() -> None:
                nonlocal total_epochs
                planned = planner.early(epoch, state["step"] - epoch_first_step, state, total_epochs)
                if planned is not None:
                    total_epochs = p.dist.same_everywhere(planned)  # rank 0's clock decides
                set_lr(optimizer, lr_factor(config.schedule, state["step"], total_epochs * steps_per_epoch))
                state["step"] += 1

            if cache is not None:
                train_stats = train_head_epoch(p.model, cache, optimizer=optimizer, batch_size=config.batch_size,
                                               generator=generator, runtime=p.runtime,
                                               drop_last=drop_last,
                                               label_smoothing=config.label_smoothing, on_step=on_step)
            else:
                train_stats = train_one_epoch(p.dist.wrap(p.model), batches, optimizer=optimizer,
                                              preprocess=p.preprocess, runtime=p.runtime,
                                              generator=p.dist.rank_streams(generator), augment=augment,
                                              label_smoothing=config.label_smoothing, on_step=on_step,
                                              total=steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}",
                                              train_mode=partial(train_mode, bn_stats=bn_stats))
                train_stats = p.dist.after_train_epoch(p.model, train_stats)
            t1 = time.perf_counter()
            if cache is not None:
                val = evaluate_head(p.model, cache.val, cache.val_targets, p.runtime)
            else:
                val_batches = p.dist.iterate_batches(images, targets, 512, indices=p.val_idx)
                val = p.dist.reduce_eval(evaluate(p.model, val_batches, preprocess=p.preprocess,
                                                  runtime=p.runtime))
            t2 = time.perf_counter()
            state["elapsed_s"] += t2 - t0
            record = {"epoch": epoch + 1, "train_loss": round(train_stats["loss"], 5),
                      "train_acc": round(train_stats["acc"], 5), "val_loss": round(val["loss"], 5),
                      "val_acc": round(val["acc"], 5), "lr": optimizer.param_groups[0]["lr"],
                      "images_per_s": round(train_stats["images_per_s"], 1),
                      "epoch_s": round(t2 - t0, 2), "elapsed_s": round(state["elapsed_s"], 2)}
            total_epochs = planner.after_epoch(epoch, state, total_epochs, t2 - t0)
            total_epochs = p.dist.same_everywhere(total_epochs)  # timings differ per rank; rank 0 decides
            improved = val["acc"] > state["best_acc"] or math.isnan(val["acc"])
            if improved:
                state["best_acc"], state["best_epoch"] = val["acc"], epoch
            state["epoch"] = epoch + 1
            state["total_epochs"] = total_epochs
            state["history"].append(record)
            if p.dist.is_main:
                save_epoch(out, p, optimizer, state, improved)
            log(f"epoch {epoch + 1}/{total_epochs}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.4f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f} "
                f"| {record['images_per_s']:.0f} img/s, {record['epoch_s']:.1f}s")
    except KeyboardInterrupt:
        done = f"epochs 1-{state['epoch']} are saved in {out}" if state["epoch"] else "no epoch had finished"
        log(f"\ninterrupted: {done}; run the same command again (or add --resume) to continue "
            f"from epoch {state['epoch'] + 1}")
        raise
    return finish_run(config, out, p, state)


def save_epoch(out: Path, p: Prepared, optimizer, state: dict, improved: bool) -> None:
    """Checkpoint first, then the best model, then metrics: see _repair_best_model for why."""
    ckpt.save_checkpoint(out / ckpt.CHECKPOINT_FILE, {
        "model": p.model.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": state["epoch"], "step": state["step"], "total_epochs": state["total_epochs"],
        "best_acc": state["best_acc"], "best_epoch": state["best_epoch"],
        "elapsed_s": state["elapsed_s"], "history": json.dumps(state["history"]),
        "head_probe": json.dumps(state["head_probe"])})
    if improved:
        ckpt.save_model(p.model, out / ckpt.MODEL_FILE, {"epoch": str(state["best_epoch"])})
    fileio.append_jsonl(out / METRICS_FILE, state["history"][-1])


def finish_run(config: TrainConfig, out: Path, p: Prepared, state: dict) -> dict:
    """Write run.json (status complete) describing the model, data and result."""
    history = state["history"]
    run = {
        "status": "complete", "config_hash": config.hash(), "model": p.model_info,
        "classes": p.data.classes.num_classes,
        "data": {"dir": str(config.data_dir), "images": len(p.data.images),
                 "train": len(p.train_idx), "val": len(p.val_idx), "quarantined": len(p.data.bad)},
        "parameters": count_parameters(p.model),
        "trainable_parameters": count_parameters(p.model, trainable_only=True),
        "epochs": state["epoch"], "best_epoch": state["best_epoch"] + 1,
        "best_val_acc": state["best_acc"], "train_seconds": round(state["elapsed_s"], 2),
        "images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1) if history else None,
        "device": p.runtime.device.type, "precision": p.runtime.precision_name(training=True),
        "inference_precision": p.runtime.precision_name(),
        "head_probe": state["head_probe"],
        **p.extra,
    }
    if p.dist.is_main:
        fileio.write_json(out / RUN_FILE, run)
    return run
