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


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgcls", "models"], capture_output=True, text=True)
    assert result.returncode == 0 and "scratch-cnn" in result.stdout
