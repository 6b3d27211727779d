"""Shared by the transfer benchmarks: one timed run = fit() on DATA/train, then accuracy on the test key."""

from __future__ import annotations

import time
from pathlib import Path

from imgcls.config import TrainConfig
from imgcls.evaluate.scoring import evaluate_run
from imgcls.train.runner import fit


def timed_run(data: Path, out: Path, **settings) -> dict:
    """Train with `settings`, score on the official test set, plain and with flip test-time
    augmentation (test_acc_tta); wall time of the training run included."""
    config = TrainConfig(data_dir=str(data / "train"), **settings)
    start = time.perf_counter()
    run = fit(config, out, overwrite=True, log=lambda line: print("   ", line, flush=True))
    wall = time.perf_counter() - start
    flipped = evaluate_run(out, data / "test", data / "test_labels.csv", tta="flip")
    test = evaluate_run(out, data / "test", data / "test_labels.csv")  # eval.json: the plain score
    return {"run": str(out), "wall_s": round(wall, 1), "train_s": run["train_seconds"], "epochs": run["epochs"],
            "val_acc": run["best_val_acc"], "test_acc": test["accuracy"], "test_acc_tta": flipped["accuracy"]}


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(" | ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print(" | ".join(f"{row[c]:>12.4f}" if isinstance(row[c], float) else f"{str(row[c]):>12}"
                         for c in columns))
