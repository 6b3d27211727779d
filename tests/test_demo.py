"""`make demo`'s library path on tiny data: grid, best model's submission in test.csv order, scored."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import imgcls.demo as demo
from conftest import make_csv_dataset
from imgcls.compare import Grid


def test_demo_writes_a_scored_submission_from_the_best_cell(tmp_path: Path, monkeypatch, capsys) -> None:
    data = make_csv_dataset(tmp_path / "fm", n_per_class=10, n_test=12)
    tiny = Grid(pairs=(("scratch-cnn-tiny", "scratch"),), per_class=(4, None), epochs=2, val_fraction=0.2,
                train_overrides={"batch_size": 16, "precision": "fp32"})
    monkeypatch.setitem(demo.PRESETS, "quick", tiny)
    metrics = demo.run_demo(data, tmp_path / "runs", preset="quick")
    out = tmp_path / "runs" / "demo-compare-quick"
    with open(out / "submission.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    with open(data / "test" / "test.csv", newline="") as fh:
        test_ids = [r[0] for r in list(csv.reader(fh))[1:]]
    assert [r[0] for r in rows[1:]] == test_ids
    with open(data / "test_labels.csv", newline="") as fh:
        key = dict(list(csv.reader(fh))[1:])
    assert metrics["count"] == 12
    assert metrics["accuracy"] == pytest.approx(sum(key[i] == y for i, y in rows[1:]) / 12)
    printed = capsys.readouterr().out
    assert "leaderboard" in printed and "report.html" in printed
    assert (out / "report.html").stat().st_size > 10_000
