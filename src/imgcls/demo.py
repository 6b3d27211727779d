"""Task 1 end to end on Fashion-MNIST: train the scratch CNN, predict the test set, score it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from imgcls.config import TrainConfig, parse_duration
from imgcls.evaluate.metrics import format_table
from imgcls.evaluate.scoring import evaluate_run
from imgcls.predict import predict_folder
from imgcls.train.runner import fit


def run_demo(data: Path, runs: Path, budget: str = "5m", epochs: int = 12) -> dict:
    """Train within `budget`, write the submission, score it against the answer key."""
    run_dir = runs / "demo-scratch-cnn"
    t0 = time.perf_counter()
    config = TrainConfig(data_dir=str(data / "train"), model="scratch-cnn", epochs=epochs,
                         time_budget_s=parse_duration(budget))
    run = fit(config, run_dir)
    submission = run_dir / "submission.csv"
    predict_folder(run_dir, data / "test", submission)
    metrics = evaluate_run(run_dir, data / "test", labels=data / "test_labels.csv")
    print(format_table(metrics))
    print(f"\nscratch-cnn: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
          f"{run['epochs']} epochs in {run['train_seconds']:.0f}s of training "
          f"({time.perf_counter() - t0:.0f}s in all)")
    print(f"submission: {submission}\nrun folder: {run_dir} (confusion.png, eval.json, metrics.jsonl)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--budget", default="5m", help="training time budget")
    args = parser.parse_args(argv)
    run_demo(args.data, args.runs, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
