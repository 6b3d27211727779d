"""Sweep scratch-CNN shapes x epochs on Fashion-MNIST: test accuracy and training time per cell.

Usage: python benchmarks/scratch_sweep.py DATA_DIR [--device auto] [--jobs 1] [--cells NAME,...]
       python benchmarks/scratch_sweep.py DATA_DIR --ablation EPOCHS [--seed 0] [--lines 0,2]
       python benchmarks/scratch_sweep.py DATA_DIR --ablation-budget 5m [--seed 0] [--lines 7,8,9,10]
DATA_DIR holds the contest layout (`imgcls data fashion-mnist DATA_DIR`). Accuracy is on the
official 10k test set; time is this machine's, so run the final choice again on the target CPU.
--ablation trains a fixed number of epochs (so accuracy does not depend on the machine's load),
one run per training-side change against the baseline, each scored with every test-time
augmentation: one line per change. --ablation-budget trains every line for the same time instead
(the comparison that decides a 5-minute recipe: a smaller network fits more epochs), which depends
on the machine and its load: run it on a quiet machine, the lines one after another.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

VARIANTS = {  # name: (widths, depths, hidden units of a flatten head (0 = global pooling)[, dropout])
    "w32-d222": ((32, 64, 128), (2, 2, 2), 0),
    "w32-d122-flat-drop4": ((32, 64, 128), (1, 2, 2), 256, 0.4),
    "w32-d122-flat128": ((32, 64, 128), (1, 2, 2), 128),
    "w32-d222-flat": ((32, 64, 128), (2, 2, 2), 256),
    "w32-d122-flat": ((32, 64, 128), (1, 2, 2), 256),
    "w32-d112-flat": ((32, 64, 128), (1, 1, 2), 256),
    "w48-d122-flat": ((48, 96, 192), (1, 2, 2), 256),
    "w32-96-d122": ((32, 96, 192), (1, 2, 2), 0),
    "w64-d122": ((64, 128, 256), (1, 2, 2), 0),
}
CELLS = [  # (variant, epochs, lr, val_fraction, augment)
    ("w32-d222-flat", 8, 4e-3, 0.0, "flip"), ("w32-d222-flat", 10, 4e-3, 0.0, "flip"),
    ("w32-d222-flat", 8, 4e-3, 0.0, "flip-shift1"), ("w32-d222-flat", 10, 4e-3, 0.0, "flip-shift"),
    ("w32-d122-flat", 8, 4e-3, 0.0, "flip"), ("w32-d122-flat", 10, 4e-3, 0.0, "flip"),
    ("w32-d112-flat", 8, 4e-3, 0.0, "flip"), ("w32-d112-flat", 12, 4e-3, 0.0, "flip"),
    ("w48-d122-flat", 8, 4e-3, 0.0, "flip"), ("w32-d222", 15, 4e-3, 0.0, "flip"),
    ("w32-96-d122", 10, 4e-3, 0.0, "flip"), ("w64-d122", 8, 4e-3, 0.0, "flip"),
    ("w32-d222-flat", 6, 4e-3, 0.0, "flip"), ("w32-d122-flat", 6, 4e-3, 0.0, "flip"),
    ("w32-d222-flat", 8, 2e-3, 0.0, "flip"), ("w32-d222-flat", 8, 4e-3, 0.1, "flip"),
]


def run_cell(args: tuple) -> dict:
    data, runs, device, (variant, epochs, lr, val_fraction, augment) = args
    import torch

    torch.set_num_threads(2)
    from imgcls.config import TrainConfig
    from imgcls.evaluate.scoring import evaluate_run
    from imgcls.models.registry import ModelSpec, register_model, get_spec
    from imgcls.models.scratch import _builder
    from imgcls.train.runner import fit

    name = f"sweep-{variant}"
    try:
        get_spec(name)
    except ValueError:
        widths, depths, hidden, *drop = VARIANTS[variant]
        kwargs = {"hidden": hidden, **({"drop_rate": drop[0]} if drop else {})}
        register_model(ModelSpec(name, _builder(widths, depths, **kwargs), "sweep variant"))
    cell = f"{variant}-e{epochs}-lr{lr:g}-v{val_fraction:g}-{augment}"
    config = TrainConfig(data_dir=str(Path(data) / "train"), model=name, epochs=epochs, lr=lr,
                         val_fraction=val_fraction, augment=augment)
    t0 = time.perf_counter()
    run = fit(config, Path(runs) / cell, overwrite=True, device=device, log=lambda s: None)
    metrics = evaluate_run(Path(runs) / cell, Path(data) / "test", Path(data) / "test_labels.csv", device=device)
    return {"cell": cell, "test_acc": round(metrics["accuracy"], 4), "train_s": run["train_seconds"],
            "img_s": run["images_per_s"], "params": run["parameters"], "wall_s": round(time.perf_counter() - t0, 1)}


# One training-side change per line, each against the first line (scratch-cnn-ema's recipe with
# 2% validation): (change, the model's shape arguments it changes, TrainConfig fields it sets).
# The shape is scratch-cnn's (widths 32-64-128, depths 1-2-2, 7x7-grid head of 256 units).
BASE_FIELDS = {"val_fraction": 0.02, "ema_decay": 0.99}
ABLATIONS = [
    ("baseline: scratch-cnn-ema (AdamW one-cycle, flip, label smoothing 0.1, EMA 0.99), 2% validation", {}, {}),
    ("- weight EMA", {}, {"ema_decay": 0.0}),
    ("+ frozen 2x2 patch whitening first", {"whiten": 2}, {}),
    ("- dropout", {"drop_rate": 0.0}, {}),
    ("+ batch 64 instead of 128", {}, {"batch_size": 64}),
    ("+ label smoothing 0.2", {}, {"label_smoothing": 0.2}),
    ("+ 1 px shift augmentation", {}, {"augment": "flip-shift1"}),
    ("whitening and no dropout (scratch-speedrun before it was halved)", {"whiten": 2, "drop_rate": 0.0}, {}),
    ("+ 24-48-96 widths", {"widths": (24, 48, 96), "whiten": 2, "drop_rate": 0.0}, {}),
    ("+ half widths, 16-32-64: scratch-speedrun", {"widths": (16, 32, 64), "whiten": 2, "drop_rate": 0.0}, {}),
    ("+ one conv fewer in stage 2 (depths 1-1-2)", {"depths": (1, 1, 2), "whiten": 2, "drop_rate": 0.0}, {}),
]


def ablation_model(index: int, shape: dict) -> str:
    """The registry name of line `index`'s model: scratch-cnn itself, or its shape with `shape` changed."""
    if not shape:
        return "scratch-cnn"
    from imgcls.models.registry import ModelSpec, get_spec, register_model
    from imgcls.models.scratch import _builder
    from imgcls.errors import OptionError

    name = f"ablation-{index}"
    try:
        get_spec(name)
    except OptionError:
        shape = {"widths": (32, 64, 128), "depths": (1, 2, 2), "hidden": 256, **shape}
        register_model(ModelSpec(name, _builder(**shape), "ablation line"))
    return name


def run_ablation(data: str, runs: str, device: str, epochs: int | None, seed: int, lines: list[int] | None,
                 budget_s: float | None = None) -> None:
    """One line per change; `budget_s` trains each line for that long instead of `epochs` (a smaller
    network fits more epochs in the same time: the comparison the 5-minute goal asks for)."""
    from imgcls.config import TTA_MODES, TrainConfig
    from imgcls.evaluate.scoring import evaluate_run
    from imgcls.train.runner import fit

    length = f"{budget_s:g} s" if budget_s else f"{epochs} epochs"
    print(f"| change ({length}, seed {seed}) | epochs | " + " | ".join(f"test acc, --tta {t}" for t in TTA_MODES)
          + " |\n|---|---|" + "---|" * len(TTA_MODES), flush=True)
    for i, (change, shape, fields) in enumerate(ABLATIONS):
        if lines is not None and i not in lines:
            continue
        out = Path(runs) / (f"ablation-b{budget_s:g}-s{seed}-{i}" if budget_s else f"ablation-e{epochs}-s{seed}-{i}")
        config = TrainConfig(data_dir=str(Path(data) / "train"), model=ablation_model(i, shape),
                             epochs=None if budget_s else epochs, time_budget_s=budget_s,
                             seed=seed, **{**BASE_FIELDS, **fields})
        run = fit(config, out, device=device, log=lambda s: None)  # resumes or reuses a finished cell
        accs = [evaluate_run(out, Path(data) / "test", Path(data) / "test_labels.csv", device=device,
                             tta=tta)["accuracy"] for tta in TTA_MODES]
        print(f"| {change} | {run['epochs']} | " + " | ".join(f"{a:.4f}" for a in accs) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--runs", default="runs/sweep")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--cells", help="comma-separated variant names to keep")
    parser.add_argument("--ablation", type=int, metavar="EPOCHS", help="the training-side ablation instead")
    parser.add_argument("--ablation-budget", metavar="DURATION", help="the ablation, each line trained this long (e.g. 5m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lines", help="comma-separated ablation line numbers (0-based) to run")
    args = parser.parse_args()
    if args.ablation or args.ablation_budget:
        from imgcls.config import parse_duration

        lines = [int(i) for i in args.lines.split(",")] if args.lines else None
        run_ablation(args.data, args.runs, args.device, args.ablation, args.seed, lines,
                     parse_duration(args.ablation_budget))
        return
    cells = [c for c in CELLS if not args.cells or c[0] in args.cells.split(",")]
    jobs = [(args.data, args.runs, args.device, c) for c in cells]
    print("| cell | test acc | train s | img/s | params |\n|---|---|---|---|---|", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(run_cell, jobs):
            print(f"| {row['cell']} | {row['test_acc']:.4f} | {row['train_s']:.0f} | {row['img_s']:.0f} "
                  f"| {row['params']:,} |", flush=True)
            print(json.dumps(row), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
