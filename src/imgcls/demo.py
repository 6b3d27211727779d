"""Task 1 end to end on Fashion-MNIST: the advisor, then the story of the quick preset (scratch on all
the data; with 100 labels per class scratch, Lite0 LP-FT and the student it teaches), then the best
model's submission, scored."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import time
from pathlib import Path

from imgcls.compare import PRESETS, markdown_table, run_compare
from imgcls.config import parse_duration
from imgcls.evaluate.metrics import classification_metrics, format_table
from imgcls.evaluate.report import grid_findings
from imgcls.evaluate.scoring import targets_from_key
from imgcls.predict import predict_folder
from imgcls.train.run_folder import RunFolder


def score_submission(submission: Path, key: Path, run_dir: Path) -> dict:
    """Score a submission CSV against the answer key, as a contest would (the run folder stays untouched)."""
    classes = RunFolder(run_dir).class_map()
    with open(submission, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    ids, labels = [r[0] for r in rows], [r[1] for r in rows]
    y_pred = classes.encode(labels, submission, list(range(2, len(rows) + 2)))
    return classification_metrics(targets_from_key(key, ids, classes), y_pred, list(classes.names))


def run_demo(data: Path, runs: Path, preset: str = "quick", cell_budget: str | None = None) -> dict:
    """Compare scratch vs transfer on one split, predict the full test set with the winner, score it."""
    t0 = time.perf_counter()
    grid = PRESETS[preset]
    if cell_budget:
        grid = dataclasses.replace(grid, time_budget_s=parse_duration(cell_budget))
    out = runs / f"demo-compare-{preset}"
    rows, report = run_compare(data / "train", data / "test", out, grid, data / "test_labels.csv")
    best = out / rows[0]["run"]
    submission = out / "submission.csv"
    predict_folder(best, data / "test", submission)
    metrics = score_submission(submission, data / "test_labels.csv", best)  # all of the official test set
    print(format_table(metrics))
    print(f"\n{markdown_table(rows)}\n")
    print("\n".join(grid_findings(rows)))
    cut = [r["run"] for r in rows if r.get("cut_short")]
    print(f"cut short by their time budget: {', '.join(cut)} (fewer epochs than planned: a busy or slow "
          f"machine, or a small --cell-budget)" if cut else "no cell was cut short by its time budget: every one trained its planned epochs")
    print(f"best: {rows[0]['run']}: test accuracy {metrics['accuracy']:.4f} on all {metrics['count']} test "
          f"images, macro-F1 {metrics['macro_f1']:.4f} ({time.perf_counter() - t0:.0f}s this time)")
    print(f"submission: {submission}\nleaderboard: {out / 'leaderboard.csv'}\nreport: {report}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--cell-budget", help="training time budget per grid cell (default: the preset's)")
    args = parser.parse_args(argv)
    run_demo(args.data, args.runs, args.preset, args.cell_budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
