"""Shared by the transfer and teaching benchmarks: train on DATA/train (or reuse a finished run),
then score on the official test key."""

from __future__ import annotations

import time
from pathlib import Path

from imgcls.config import TrainConfig
from imgcls.evaluate.scoring import evaluate_run
from imgcls.train.run_folder import RunFolder
from imgcls.train.runner import fit

WALL_FILE = "wall_s.txt"  # a benchmark's own record: the training command's wall time, kept for reuse


def test_scores(data: Path, out: Path, tta: bool = True) -> dict:
    """Official test accuracy, plain and (with `tta`) with flip test-time augmentation; the plain
    pass runs last so that the run's eval.json keeps the plain score."""
    flipped = evaluate_run(out, data / "test", data / "test_labels.csv", tta="flip") if tta else None
    plain = evaluate_run(out, data / "test", data / "test_labels.csv")
    return {"test_acc": round(plain["accuracy"], 4), "test_acc_tta": round(flipped["accuracy"], 4) if tta else "",
            "predict_img_s": plain["predict_images_per_s"]}


def fit_timed(data: Path, out: Path, reuse: bool = False, **settings) -> tuple[dict, float]:
    """fit() with `settings` on DATA/train: the run.json and the wall time of the training command.
    With `reuse`, a finished run folder is kept as it is, with the wall time it recorded then."""
    if not (reuse and RunFolder(out).is_complete()):
        start = time.perf_counter()
        fit(TrainConfig(data_dir=str(data / "train"), **settings), out, overwrite=not reuse,
            log=lambda line: print("   ", line, flush=True))
        (out / WALL_FILE).write_text(f"{time.perf_counter() - start:.1f}\n")
    run = RunFolder(out).read_run()
    wall = float((out / WALL_FILE).read_text()) if (out / WALL_FILE).exists() else run["train_seconds"]
    return run, round(wall, 1)


def timed_run(data: Path, out: Path, **settings) -> dict:
    """Train with `settings` (a fresh run), score on the official test set; wall time included."""
    run, wall = fit_timed(data, out, **settings)
    return {"run": str(out), "wall_s": wall, "train_s": run["train_seconds"], "epochs": run["epochs"],
            "val_acc": run["best_val_acc"], **test_scores(data, out)}


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(" | ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>12.4f}" if isinstance(row[c], float) else f"{str(row[c]):>12}"
                         for c in columns))
