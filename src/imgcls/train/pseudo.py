"""Pseudo-labels: unlabelled images the teacher is confident about join the training set.

`--unlabelled DIR` names a dataset folder (a CSV with ids, plus images; labels in it are ignored).
The teacher (`--teacher`) predicts each of its images once; an image whose top probability reaches
`--pseudo-threshold` joins training with the teacher's probabilities (soft, at
`--distill-temperature`) or its top class (hard) as the target. An image that is one of the run's
own training or validation images (the same file, or the same decoded pixels) is left out, so the
validation split is never trained on and a labelled image keeps its label.

Self-training is two runs: train on the labels, then train again with that run as the teacher and
`--distill-weight 0` (the labelled images keep their labels; only the unlabelled ones learn from it).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.data import Dataset, load_dataset
from imgcls.data.source import ImageSource
from imgcls.train.distill import distillation_targets, teacher_logits


def _digests(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def pseudo_labels(config, teacher, data: Dataset, train_idx: torch.Tensor,
                  val_idx: torch.Tensor) -> tuple[ImageSource, torch.Tensor, torch.Tensor, dict]:
    """(the kept images at the training layout, their targets, their top classes, run.json's record)."""
    start = time.perf_counter()
    unlabelled = load_dataset(config.unlabelled, require_labels=False, channels=data.channels,
                              size=data.image_size, resize=data.resize, on_bad="skip")
    labelled_files = {data.table.paths[i].resolve() for i in torch.cat([train_idx, val_idx]).tolist()}
    val_pixels = set(_digests(data.source.gather(val_idx)))
    new_file = [i for i, path in enumerate(unlabelled.table.paths) if path.resolve() not in labelled_files]
    digests = _digests(unlabelled.source.gather(torch.tensor(new_file, dtype=torch.long))) if new_file else []
    candidates = [i for i, digest in zip(new_file, digests) if digest not in val_pixels]
    validation_copies = len(new_file) - len(candidates)

    decoded = teacher.load(config.unlabelled, on_bad="skip")  # at the teacher's own input layout
    position = {image_id: i for i, image_id in enumerate(decoded.ids)}
    candidates = [i for i in candidates if unlabelled.ids[i] in position]
    index = torch.tensor([position[unlabelled.ids[i]] for i in candidates], dtype=torch.long)
    logits = teacher_logits(teacher, decoded.source.gather(index)) if candidates else \
        torch.empty((0, data.classes.num_classes))
    confidence, top = torch.softmax(logits.double(), 1).max(1)
    keep = confidence >= config.pseudo_threshold
    kept = torch.tensor(candidates, dtype=torch.long)[keep]
    if config.pseudo_targets == "soft":
        targets = distillation_targets(logits[keep], top[keep], config.distill_temperature, 1.0)
    else:
        targets = F.one_hot(top[keep], data.classes.num_classes).float()
    per_class = np.bincount(top[keep].numpy(), minlength=data.classes.num_classes)
    record = {"dir": str(config.unlabelled), "images": len(unlabelled.ids),
              "left_out_labelled_files": len(unlabelled.ids) - len(new_file),
              "left_out_validation_copies": validation_copies,
              "candidates": len(candidates), "kept": int(keep.sum()), "threshold": config.pseudo_threshold,
              "targets": config.pseudo_targets, "teacher_tta": teacher.tta, "per_class": per_class.tolist(),
              "seconds": round(time.perf_counter() - start, 2)}
    return unlabelled.source.subset(kept), targets, top[keep], record
