"""Validation that fits a time budget, and best-model selection that compares like with like.

A pass the deadline cuts short validates on a prefix of one seeded, class-stratified order of the
validation split, so every cut pass is a fair sample, and two cut passes share their shorter
prefix. Each pass records which images it got right (its marks); two models are compared on the
images both were validated on, never a full pass against a subset.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imgcls.data.source import ImageSource
from imgcls.data.transforms import Preprocess
from imgcls.runtime import Runtime
from imgcls.train.budget import PACED_FLOOR, PacedStop, paced_slices

# Validation batches under a deadline: a pass can end close to it (64 Lite0 images at 96 px take
# seconds on a busy 2-core machine), and a cut batch is no smaller than PACED_FLOOR.
PACED_VAL_BATCH = 64
NOT_VALIDATED = -1


def stratified_order(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """Positions 0..n-1 of `targets` in a seeded order whose every prefix holds each class in about
    its share of the whole: image r of a class of n_c (in a seeded shuffle) sorts at (r + 0.5) / n_c,
    so the classes interleave in proportion."""
    shuffled = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    classes = targets[shuffled]
    keys = torch.empty(len(classes), dtype=torch.float64)
    for label in classes.unique():
        where = torch.nonzero(classes == label).flatten()
        keys[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5) / len(where)
    return shuffled[torch.sort(keys, stable=True).indices]  # ties keep the seeded shuffle's order


def marks_of(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per image of an n-image split: 1 right, 0 wrong, NOT_VALIDATED; `logits` and `targets` are
    those of the split's positions `rows` (None: all of them, in order)."""
    right = (logits.argmax(1) == targets).to(torch.int8) if len(targets) else torch.empty(0, dtype=torch.int8)
    if rows is None:
        return right
    marks = torch.full((n,), NOT_VALIDATED, dtype=torch.int8)
    marks[rows] = right
    return marks


def beats(marks: torch.Tensor | None, acc: float, best_marks: torch.Tensor | None, best_acc: float) -> bool:
    """Whether a model validated with `marks` (accuracy `acc`) beats the best so far: compared on the
    images both were validated on; on accuracies where they share none or marks are missing (under
    torchrun each rank holds only its shard's). A tie between passes over the same images goes to the
    later model: it trained longer, at the lower learning rate the schedule ends on (ties are common
    on a small validation split, and keeping the earlier kept a mid-schedule model); a cut pass that
    ties on a subset does not replace a model validated on more. A NaN accuracy (no validation
    images) always wins: the latest model is then kept, as without validation."""
    if math.isnan(acc):
        return True
    if marks is not None and best_marks is not None and len(marks) == len(best_marks):
        seen, best_seen = marks != NOT_VALIDATED, best_marks != NOT_VALIDATED
        both = seen & best_seen
        if both.any():
            ours, theirs = marks[both].float().mean(), best_marks[both].float().mean()
            return bool(ours > theirs or (ours == theirs and torch.equal(seen, best_seen)))
    return acc >= best_acc


@torch.no_grad()
def validate_paced(model: torch.nn.Module, source: ImageSource, targets: torch.Tensor, val_idx: torch.Tensor,
                   order: torch.Tensor, *, preprocess: Preprocess, runtime: Runtime, pace: PacedStop) -> dict:
    """Loss, accuracy and marks over the longest prefix of `order` (positions in `val_idx`) whose
    batches end in time; "images" says how many were validated."""
    model.eval()
    outputs = []
    for part in paced_slices(len(order), PACED_VAL_BATCH, pace, least=PACED_FLOOR):
        x = preprocess(source.gather(val_idx[order[part]]), runtime.device, runtime.channels_last)
        with runtime.autocast():
            outputs.append(model(x).float().cpu())
    if not outputs:
        return {"loss": float("nan"), "acc": float("nan"), "marks": marks_of(torch.empty(0, 1), targets[:0], None, 0),
                "images": 0}
    logits = torch.cat(outputs)
    rows = order[:len(logits)]
    y = targets[val_idx[rows]]
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (logits.argmax(1) == y).float().mean().item(),
            "marks": marks_of(logits, y, rows, len(order)), "images": len(rows)}
