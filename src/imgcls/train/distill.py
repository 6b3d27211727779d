"""Distillation: a teacher's probabilities on the training images become the student's targets.

The teacher (a run folder or an ensemble) predicts each training image once, before the first
epoch, and the student learns from `weight * softmax(teacher logits / T) + (1 - weight) * labels`
with its usual cross-entropy (soft targets; the student's own logits are not tempered, so T -> 0
with weight 1 is exactly training on the teacher's hard labels).

Once per image, not per augmented view: the teachers worth distilling (an ImageNet backbone at
96 px or more, or an ensemble of them) cost many student epochs per pass, so re-running one on
every augmented batch would make the student's training cost the teacher's; the small-image
augmentations (flips, shifts of a few pixels) change a teacher's answer on few images.
Validation images are never shown to the teacher for targets: the student's model selection
stays on labels nobody distilled.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imgcls.errors import ImgclsError, OptionError, RunFolderError
from imgcls.train.run_folder import RunFolder


def distillation_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                         weight: float) -> torch.Tensor:
    """float32 N x C targets: the teacher's tempered probabilities mixed with one-hot labels."""
    num_classes = teacher_logits.shape[1]
    if temperature <= 0:  # the limit T -> 0: the teacher's hard labels
        teacher = F.one_hot(teacher_logits.argmax(1), num_classes).double()
    else:
        teacher = torch.softmax(teacher_logits.double() / temperature, dim=1)
    hard = F.one_hot(labels.long(), num_classes).double()
    return (weight * teacher + (1.0 - weight) * hard).float()


def check_distillation(config) -> None:
    """Options that cannot teach, refused before any data loads."""
    if not 0.0 <= config.distill_weight <= 1.0:
        raise OptionError(f"--distill-weight {config.distill_weight}: must be between 0 and 1")
    if config.distill_temperature < 0:
        raise OptionError(f"--distill-temperature {config.distill_temperature}: must be 0 or more")
    if not 0.0 <= config.pseudo_threshold <= 1.0:
        raise OptionError(f"--pseudo-threshold {config.pseudo_threshold}: must be between 0 and 1")
    if config.teacher_tta != "none" and not config.teacher:
        raise OptionError("--teacher-tta needs --teacher: it is how the teacher predicts its targets")
    if config.unlabelled and not config.teacher:
        raise OptionError("--unlabelled needs --teacher: the run or ensemble whose confident predictions "
                          "label those images (for self-training, a first run on the labels alone)")
    from imgcls.train.strategies import AUTO, get_strategy

    if config.strategy != AUTO and get_strategy(config.strategy).uses_feature_cache(config):
        raise OptionError("--teacher needs training on images; the head strategy trains on cached "
                          "features: add --no-cache-features")
    if not RunFolder(config.teacher).is_complete():
        raise RunFolderError(f"{config.teacher}: --teacher needs a finished run or ensemble folder")


def _teacher_runs(folder: RunFolder) -> list[RunFolder]:
    """The run folders that trained: the folder itself, or an ensemble's members (at any depth)."""
    if not folder.is_ensemble():
        return [folder]
    return [run for member in folder.read_ensemble()["members"] for run in _teacher_runs(RunFolder(member))]


def _held_out_ids(folder: RunFolder) -> set[str] | None:
    """Validation ids the teacher never trained on (an ensemble: those all its members held out);
    None when a run does not list them."""
    runs = _teacher_runs(folder)
    if not all(run.has(run.SPLIT) for run in runs):
        return None
    return set.intersection(*(set(run.read_split()["val_ids"]) for run in runs))


def other_labelled_subsets(config) -> list[str]:
    """One line per teacher run whose labelled subset is not this run's: where either draws
    --per-class images, the subset follows --seed, --per-class and --val-fraction together, so a
    teacher trained with other values learned, with their labels, images that this run may take
    as unlabelled or validation ones (the pipeline then uses more labels than it says)."""
    mine = (config.seed, config.per_class, config.val_fraction)
    lines = []
    for run in _teacher_runs(RunFolder(config.teacher)):
        split = run.read_split() if run.has(run.SPLIT) else None
        if split is None or "per_class" not in split:  # older runs do not say
            continue
        theirs = (split["seed"], split["per_class"], split.get("val_fraction"))
        if theirs != mine and (config.per_class or split["per_class"]):
            lines.append(f"teacher {run.path} trained on another labelled subset (--seed {theirs[0]} "
                         f"--per-class {theirs[1]} --val-fraction {theirs[2]}; this run: --seed {mine[0]} "
                         f"--per-class {mine[1]} --val-fraction {mine[2]}): images it learned with their labels "
                         f"may be unlabelled or validation images here; give both the same three values")
    return lines


def load_teacher(config, data, device: str = "auto", log=print, prefer_onnx: bool = True):
    """The teacher's predictor; it must predict the training data's classes, in the same order.

    On a CPU it runs through its fp32 ONNX graph (exported into the teacher's folder when missing,
    as `imgcls export` would): the same probabilities as eager PyTorch within 1e-5, in less time
    for the backbones that make good teachers (README, "Prediction engines"); eager PyTorch where
    the export is not possible, on a GPU, and under torchrun (`prefer_onnx` False: ranks would
    export into the teacher's folder at once)."""
    from imgcls.predict import load_predictor  # predict imports the training stack
    from imgcls.runtime import pick_device

    teacher = None
    if prefer_onnx and pick_device(device).type == "cpu":
        try:
            teacher = load_predictor(config.teacher, engine="onnx", device=device)
        except (ImgclsError, ImportError) as exc:
            log(f"teacher {config.teacher}: no ONNX graph ({str(exc).splitlines()[0]}); it predicts through PyTorch")
    teacher = teacher or load_predictor(config.teacher, device=device)
    teacher.tta = config.teacher_tta
    if list(teacher.classes.labels) != list(data.classes.labels):
        raise RunFolderError(f"{config.teacher}: the teacher predicts classes {list(teacher.classes.labels)[:10]}, "
                             f"the training data has {list(data.classes.labels)[:10]}; they must be the same")
    return teacher


def teacher_logits(teacher, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on uint8 images; with test-time augmentation (teacher.tta) the log of
    its probabilities averaged over the views, whose softmax is that average (and which a
    temperature sharpens or spreads like logits)."""
    if teacher.tta == "none":
        return torch.from_numpy(teacher.predict_logits(images))
    return torch.from_numpy(teacher.predict_proba(images)).double().clamp_min(1e-30).log().float()


def teacher_targets(config, teacher, data, train_idx: torch.Tensor,
                    val_idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(targets for every row of `data`: the mixed ones on training rows, one-hot labels elsewhere,
    and what run.json records about the teacher)."""
    start = time.perf_counter()
    decoded = teacher.load(config.data_dir, classes=teacher.classes)  # at the teacher's own input layout
    position = {image_id: i for i, image_id in enumerate(decoded.ids)}
    ids = data.ids

    def logits_of(rows: torch.Tensor) -> torch.Tensor:
        index = torch.tensor([position[ids[i]] for i in rows.tolist()], dtype=torch.long)
        return teacher_logits(teacher, decoded.source.gather(index))

    train_logits = logits_of(train_idx)
    targets = F.one_hot(data.targets.long(), data.classes.num_classes).float()
    targets[train_idx] = distillation_targets(train_logits, data.targets[train_idx],
                                              config.distill_temperature, config.distill_weight)
    val_acc = (logits_of(val_idx).argmax(1) == data.targets[val_idx]).float().mean().item() if len(val_idx) else None
    held_out = _held_out_ids(RunFolder(config.teacher))
    seen = None if held_out is None else sum(ids[i] not in held_out for i in val_idx.tolist())
    record = {"run": str(Path(config.teacher).resolve()), "kind": teacher.model_info["name"], "engine": teacher.engine,
              "tta": teacher.tta,
              "best_val_acc": RunFolder(config.teacher).read_run().get("best_val_acc"),
              "student_val_acc": None if val_acc is None else round(val_acc, 5),
              "student_val_images_teacher_trained_on": seen,
              "train_agreement": round((train_logits.argmax(1) == data.targets[train_idx]).float().mean().item(), 5),
              "temperature": config.distill_temperature, "weight": config.distill_weight,
              "images": len(train_idx), "seconds": round(time.perf_counter() - start, 2)}
    return targets, record
