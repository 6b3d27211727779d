"""The CLI end to end on tiny data: train -> evaluate -> predict, and the run folder it leaves."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from imgcls.cli import main

TRAIN_FAST = ["--model", "scratch-cnn-tiny", "--batch-size", "16", "--precision", "fp32"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_train_evaluate_predict_end_to_end(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert run_cli("train", csv_dataset / "train", "--out", run, "--epochs", "3", "--lr", "0.01", *TRAIN_FAST) == 0
    for name in ("config.json", "classes.json", "model.safetensors", "checkpoint.pt",
                 "metrics.jsonl", "split.json", "run.json"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert set(load_file(run / "model.safetensors")) >= {"fc.weight", "fc.bias"}
    split = json.loads((run / "split.json").read_text())
    assert len(split["val_ids"]) == 3 and split["train_count"] == 33  # 10% stratified, 1 per class

    assert run_cli("evaluate", run, csv_dataset / "test", "--labels", csv_dataset / "test_labels.csv") == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "circle" in out
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["count"] == 9 and 0.0 <= evaluation["accuracy"] <= 1.0
    assert sum(map(sum, evaluation["confusion"])) == 9
    assert (run / "confusion.png").stat().st_size > 1000
    assert read_rows(run / "confusion.csv")[0][1:] == ["circle", "square", "bar"]

    submission = tmp_path / "submission.csv"
    assert run_cli("predict", run, csv_dataset / "test", "--out", submission) == 0
    rows = read_rows(submission)
    test_ids = [r[0] for r in read_rows(csv_dataset / "test" / "test.csv")[1:]]
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == test_ids  # test.csv order
    assert all(r[1] in {"0", "1", "2"} for r in rows[1:])  # ints stay ints
    # The submission scores the same as evaluate did.
    key = dict(read_rows(csv_dataset / "test_labels.csv")[1:])
    accuracy = sum(key[i] == label for i, label in rows[1:]) / len(rows[1:])
    assert accuracy == pytest.approx(evaluation["accuracy"])


def test_string_labels_come_back_as_strings(string_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", string_dataset / "train", "--out", run, "--epochs", "1", *TRAIN_FAST) == 0
    assert run_cli("predict", run, string_dataset / "test", "--out", tmp_path / "s.csv") == 0
    rows = read_rows(tmp_path / "s.csv")
    assert rows[1][0].endswith(".png")  # ids exactly as test.csv wrote them
    assert {r[1] for r in rows[1:]} <= {"bar", "circle", "square"}


def test_class_folder_layout_trains(folder_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", folder_dataset, "--out", run, "--epochs", "1", *TRAIN_FAST) == 0
    assert run_cli("evaluate", run, folder_dataset) == 0
    assert json.loads((run / "eval.json").read_text())["count"] == 24


def test_training_learns_the_synthetic_task(csv_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", csv_dataset / "train", "--out", run, "--epochs", "12", "--model", "scratch-cnn",
                   "--batch-size", "8", "--lr", "0.005", "--val-fraction", "0.25", "--augment", "none") == 0
    assert run_cli("evaluate", run, csv_dataset / "test", "--labels", csv_dataset / "test_labels.csv") == 0
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0.75  # chance is 0.33


def test_rerun_of_a_complete_run_does_not_retrain(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = ["train", csv_dataset / "train", "--out", run, "--epochs", "1", *TRAIN_FAST]
    assert run_cli(*args) == 0
    before = (run / "model.safetensors").stat().st_mtime_ns
    assert run_cli(*args) == 0
    assert "already complete" in capsys.readouterr().out
    assert (run / "model.safetensors").stat().st_mtime_ns == before


def test_time_budget_limits_epochs(csv_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_cli("train", csv_dataset / "train", "--out", run, "--epochs", "500",
                   "--time-budget", "3s", *TRAIN_FAST) == 0
    info = json.loads((run / "run.json").read_text())
    assert 1 <= info["epochs"] < 500
    assert info["train_seconds"] < 3 * 1.5  # fits the budget, give or take one epoch


def test_time_budget_sizes_the_schedule_within_the_first_epoch(csv_dataset: Path, tmp_path: Path) -> None:
    """The first epoch must already run on the schedule of the epochs that fit, not of --epochs."""
    from imgcls.train.optim import lr_factor
    run = tmp_path / "run"
    assert run_cli("train", csv_dataset / "train", "--out", run, "--epochs", "2000", "--time-budget", "3s",
                   "--model", "scratch-cnn-tiny", "--batch-size", "2", "--precision", "fp32", "--lr", "1e-3") == 0
    info = json.loads((run / "run.json").read_text())
    steps = info["data"]["train"] // 2
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    planned_for_all = 1e-3 * lr_factor("onecycle", steps, 2000 * steps)
    fitted = 1e-3 * lr_factor("onecycle", steps, info["epochs"] * steps)
    assert info["epochs"] < 1000  # the budget did bind
    assert first["lr"] > 2 * planned_for_all
    assert 0.5 < first["lr"] / fitted < 2  # the early estimate agrees with what the whole run fitted


def test_budget_planner_waits_for_the_first_epoch_that_trains_the_backbone(monkeypatch) -> None:
    """A finetune warm-up epoch trains only the head: its speed says nothing about the epochs after it."""
    from imgcls.config import TrainConfig
    from imgcls.train import runner
    # The planner reads the clock before steps 1-9: 1 s a step, but for one 30-s pause it must ignore.
    clock = iter([100.0, 101.0, 102.0, 133.0, 134.0, 135.0, 136.0, 137.0, 138.0])
    monkeypatch.setattr(runner.time, "perf_counter", lambda: float(next(clock)))
    config = TrainConfig(data_dir="x", strategy="finetune", warmup_epochs=1, epochs=100, time_budget_s=100)
    planner = runner.BudgetPlanner(config, steps_per_epoch=20, n_train=1000, n_val=0)
    state = {"elapsed_s": 10.0}  # the warm-up epoch took 10 s
    assert all(planner.early(0, step, state, 100) is None for step in range(20))
    plans = [planner.early(1, step, state, 100) for step in range(20)]
    # The median step took 1 s, 20 s per epoch; 10 + 20 s after epoch 2,
    # then 70 s left hold 3 more: 5 epochs.
    assert plans[:9] == [None] * 9 and plans[10:] == [None] * 10
    assert plans[9] == 5
    # The first full epoch measures better than 8 steps, either way; later epochs only shrink the plan.
    assert planner.after_epoch(1, {"elapsed_s": 25.0}, 5, 15.0) == 7  # 2 done, 75 s left: 5 more
    assert planner.after_epoch(2, {"elapsed_s": 35.0}, 7, 10.0) == 7  # 3 done, 65 s left would allow 9
    assert planner.after_epoch(2, {"elapsed_s": 45.0}, 7, 20.0) == 5  # 3 done, 55 s left: 2 more


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgcls", "models"], capture_output=True, text=True)
    assert result.returncode == 0 and "scratch-cnn" in result.stdout
