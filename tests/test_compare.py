"""The comparison grid: every cell a run folder, resumable, and a leaderboard that matches the folders."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import make_csv_dataset
from imgcls.compare import (Grid, LEADERBOARD_FILE, make_pairs, markdown_table, parse_per_class,
                            read_leaderboard, run_grid)

GRID = Grid(pairs=(("scratch-cnn-tiny", "scratch"),), per_class=(4, None), seeds=(0, 1), epochs=2,
            val_fraction=0.2, train_overrides={"batch_size": 16})


class Interrupt:
    """A log sink that raises Ctrl-C right after the first epoch of the `nth` cell."""

    def __init__(self, nth: int, total: int):
        self.prefix, self.active, self.lines = f"[{nth}/{total}] ", False, []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith(self.prefix) and "done" not in line:
            self.active = True
        if self.active and line.startswith("epoch 1/"):
            raise KeyboardInterrupt


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_csv_dataset(tmp_path / "ds", n_per_class=10, n_test=12)


def test_interrupted_grid_resumes_without_retraining_finished_cells(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    names = [c.name for c in GRID.cells()]
    with pytest.raises(KeyboardInterrupt):
        run_grid(data / "train", data / "test", out, GRID, labels=data / "test_labels.csv", log=Interrupt(3, 4))
    done = {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in names[:2]}
    assert all((out / n / "eval.json").exists() for n in names[:2])
    assert not (out / names[2] / "run.json").exists() and (out / names[2] / "checkpoint.pt").exists()
    assert not (out / names[3]).exists()

    lines: list[str] = []
    rows = run_grid(data / "train", data / "test", out, GRID, labels=data / "test_labels.csv", log=lines.append)
    assert {n: (out / n / "model.safetensors").stat().st_mtime_ns for n in names[:2]} == done
    assert sum("finished earlier, skipped" in line for line in lines) == 2
    assert any(line.startswith("resuming after epoch 1") for line in lines)
    history = [json.loads(x) for x in (out / names[2] / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert sorted(r["run"] for r in rows) == sorted(names)


def test_leaderboard_matches_run_folders(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    rows = run_grid(data / "train", data / "test", out, GRID, labels=data / "test_labels.csv", log=lambda _: None)
    on_disk = read_leaderboard(out / LEADERBOARD_FILE)
    assert [r["run"] for r in on_disk] == [r["run"] for r in rows]
    accs = [float(r["test_accuracy"]) for r in on_disk]
    assert accs == sorted(accs, reverse=True)
    for row in on_disk:
        ev = json.loads((out / row["run"] / "eval.json").read_text())
        run = json.loads((out / row["run"] / "run.json").read_text())
        assert float(row["test_accuracy"]) == pytest.approx(ev["accuracy"], abs=1e-4)
        assert float(row["macro_f1"]) == pytest.approx(ev["macro_f1"], abs=1e-4)
        assert int(row["train_images"]) == run["data"]["train"]
        assert ev["count"] == 12  # every cell scored on the same full test set
    small = [r for r in on_disk if r["per_class"] == "4"]
    assert small and all(int(r["train_images"]) == 3 * 4 for r in small)
    table = markdown_table(on_disk)
    assert table.count("\n") == len(on_disk) + 1 and "scratch-cnn-tiny / scratch" in table


def test_test_limit_scores_the_same_subset_for_every_cell(data: Path, tmp_path: Path) -> None:
    grid = Grid(pairs=GRID.pairs, per_class=(4,), seeds=(0, 1), epochs=1, val_fraction=0.2, test_limit=5)
    run_grid(data / "train", data / "test", tmp_path / "cmp", grid, labels=data / "test_labels.csv",
             log=lambda _: None)
    import numpy as np
    indices = [np.load(tmp_path / "cmp" / c.name / "test_proba.npz")["index"] for c in grid.cells()]
    assert len(indices[0]) == 5 and (indices[0] == indices[1]).all()


def test_changed_settings_retrain_the_cell_and_keep_the_earlier_run(data: Path, tmp_path: Path) -> None:
    out, labels = tmp_path / "cmp", data / "test_labels.csv"
    grid = Grid(pairs=GRID.pairs, per_class=(4,), seeds=(0,), epochs=1, val_fraction=0.2,
                train_overrides={"batch_size": 16, "lr": 0.004})
    name = grid.cells()[0].name
    run_grid(data / "train", data / "test", out, grid, labels=labels, log=lambda _: None)
    first = (out / name / "model.safetensors").read_bytes()

    # Only the test subset changed: the cell is scored again, not trained again.
    lines: list[str] = []
    run_grid(data / "train", data / "test", out, replace(grid, test_limit=5), labels=labels, log=lines.append)
    assert (out / name / "model.safetensors").read_bytes() == first
    assert json.loads((out / name / "eval.json").read_text())["count"] == 5
    assert not any("finished earlier" in line or line.startswith("epoch ") for line in lines)

    # A new lr and budget: the earlier run is moved aside intact and the cell trains under the new settings.
    changed = replace(grid, epochs=2, train_overrides={"batch_size": 16, "lr": 0.01})
    lines.clear()
    rows = run_grid(data / "train", data / "test", out, changed, labels=labels, log=lines.append)
    moved = [line for line in lines if "settings changed since it ran" in line]
    assert len(moved) == 1 and "epochs: 1 -> 2" in moved[0] and "lr: 0.004 -> 0.01" in moved[0]
    (old_dir,) = (out / "superseded").iterdir()
    assert old_dir.name.startswith(name) and (old_dir / "model.safetensors").read_bytes() == first
    assert json.loads((out / name / "config.json").read_text())["lr"] == 0.01
    assert [h["epoch"] for h in map(json.loads, (out / name / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert [r["run"] for r in rows] == [name] and rows[0]["epochs"] == 2


def test_bad_grid_options_fail_clearly() -> None:
    assert parse_per_class("10, 100,all") == (10, 100, None)
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        parse_per_class("10,lots")
    with pytest.raises(ValueError, match="unknown strategy 'frozen'"):
        make_pairs(["scratch-cnn"], ["frozen"])
    with pytest.raises(ValueError, match="unknown model 'nope-net'"):
        make_pairs(["nope-net"], ["scratch"])
    # A scratch CNN has nothing to transfer: only its scratch cell is kept.
    assert make_pairs(["scratch-cnn", "efficientnet_lite0"], ["scratch", "head"]) == (
        ("scratch-cnn", "scratch"), ("efficientnet_lite0", "scratch"), ("efficientnet_lite0", "head"))


def test_cli_compare_end_to_end_and_bad_input(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from imgcls.cli import main

    out = tmp_path / "cmp"
    args = ["compare", str(data / "train"), "--test", str(data / "test"), "--labels", str(data / "test_labels.csv"),
            "--out", str(out), "--models", "scratch-cnn-tiny", "--strategies", "scratch", "--per-class", "4",
            "--seeds", "0", "--time-budget", "3s", "--test-limit", "0", "--no-advise"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and "| scratch-cnn-tiny / scratch (seed 0) | 4 |" in printed
    assert [r["run"] for r in read_leaderboard(out / LEADERBOARD_FILE)] == ["scratch-cnn-tiny-scratch-pc4-s0"]
    assert main(args[:-9] + ["--per-class", "lots"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "imgcls: error: --per-class 'lots': use positive integers or 'all', e.g. 10,100,all"]


def test_a_cells_own_settings_override_the_grid_and_a_cut_short_cell_says_so(data: Path, tmp_path: Path) -> None:
    from imgcls.compare import Cell

    grid = Grid(pairs=(), per_class=(), epochs=2, val_fraction=0.2, train_overrides={"batch_size": 16},
                extra=(Cell("scratch-cnn-tiny", "scratch", 4, 0, settings=(("epochs", 3), ("val_fraction", 0.0))),
                       Cell("scratch-cnn-tiny", "scratch", None, 0, settings=(("time_budget_s", 0.001),))))
    out = tmp_path / "cmp"
    rows = {r["per_class"]: r for r in run_grid(data / "train", data / "test", out, grid,
                                                 labels=data / "test_labels.csv", log=lambda _: None)}
    assert rows[4]["epochs"] == 3 and rows[4]["cut_short"] == ""  # its own epochs, no budget: never cut
    assert rows[4]["best_val_acc"] is None and rows["all"]["best_val_acc"] is not None  # no split: none to show
    assert json.loads((out / rows[4]["run"] / "split.json").read_text())["val_ids"] == []
    config = json.loads((out / rows["all"]["run"] / "config.json").read_text())
    assert config["epochs"] == 2 and config["time_budget_s"] == 0.001  # the grid's epochs, its own budget
    assert "epochs" in rows["all"]["cut_short"].split("+")  # a 1 ms budget ends before 2 epochs on any machine
    on_disk = {r["per_class"]: r for r in read_leaderboard(out / LEADERBOARD_FILE)}
    assert on_disk["all"]["cut_short"] == rows["all"]["cut_short"]
    assert float(on_disk["4"]["pipeline_seconds"]) == pytest.approx(rows[4]["train_seconds"], abs=0.1)
    table = markdown_table(list(on_disk.values()))
    assert f"cut short: {rows['all']['cut_short']}" in table and table.count("cut short") == 1
    from imgcls.evaluate.report import write_report

    page = write_report(out, list(on_disk.values())).read_text()
    assert page.count(f"cut short: {rows['all']['cut_short']}") == 1 and page.count("not cut") == 1
