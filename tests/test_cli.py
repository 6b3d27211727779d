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
from imgcls.config import TrainConfig

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
    assert run_cli("predict", run, csv_dataset / "test", "--out", submission, "--engine", "torch") == 0  # as evaluate
    rows = read_rows(submission)
    test_ids = [r[0] for r in read_rows(csv_dataset / "test" / "test.csv")[1:]]
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == test_ids  # test.csv order
    assert all(r[1] in {"0", "1", "2"} for r in rows[1:])  # ints stay ints
    # The submission scores the same as evaluate did.
    key = dict(read_rows(csv_dataset / "test_labels.csv")[1:])
    accuracy = sum(key[i] == label for i, label in rows[1:]) / len(rows[1:])
    assert accuracy == pytest.approx(evaluation["accuracy"])

    # Loose images (no CSV): one row per image, by file name, with the dataset path's labels.
    import shutil
    loose = tmp_path / "loose"
    loose.mkdir()
    by_id = dict(rows[1:])
    for image_id in reversed(test_ids):
        shutil.copy(csv_dataset / "test" / "images" / f"{image_id}.png", loose / f"{image_id}.png")
    assert run_cli("predict", run, loose, "--out", tmp_path / "loose.csv") == 0
    loose_rows = read_rows(tmp_path / "loose.csv")
    assert [r[0] for r in loose_rows[1:]] == sorted(f"{i}.png" for i in test_ids)
    assert all(by_id[name.removesuffix(".png")] == label for name, label in loose_rows[1:])
    assert run_cli("predict", run, loose / f"{test_ids[0]}.png", "--out", tmp_path / "one.csv") == 0
    assert read_rows(tmp_path / "one.csv")[1:] == [[f"{test_ids[0]}.png", by_id[test_ids[0]]]]
    # Top-k: the k best classes, best first; the first label is the prediction.
    assert run_cli("predict", run, loose, "--out", tmp_path / "top2.csv", "--top-k", "2") == 0
    top = read_rows(tmp_path / "top2.csv")
    assert top[0] == ["id", "label", "probability", "label_2", "probability_2"]
    for (name, first, p1, second, p2), (_, label) in zip(top[1:], loose_rows[1:]):
        assert first == label and first != second
        assert 1.0 >= float(p1) >= float(p2) >= 0.0 and float(p1) + float(p2) <= 1.0 + 1e-6


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


def train_help_entries() -> dict[str, str]:
    """--flag -> its help text, as `imgcls train --help` prints it (argparse's own formatter)."""
    from imgcls.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    return {action.option_strings[-1]: train._get_formatter()._expand_help(action)
            for action in train._actions if action.option_strings and action.dest != "help"}


def test_every_train_option_has_help_that_shows_its_default() -> None:
    import dataclasses

    from imgcls.config import TrainConfig

    entries = train_help_entries()
    for flag, text in entries.items():
        assert text.strip() and ("(default: " in text or flag == "--out"), flag  # --out is required
    assert "(default: 0.004)" in entries["--lr"] and "(default: auto)" in entries["--batch-size"]
    assert "(default: auto)" in entries["--epochs"]
    assert "(default: on; this flag turns it off)" in entries["--no-channels-last"]
    from imgcls.train.strategies import strategy_names
    assert f"Registered: {' / '.join(strategy_names())} / auto." in entries["--strategy"]
    # Every field but the free-form record is an option; nothing is declared twice.
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data_dir", "extra"}
    from imgcls.cli import build_parser
    args = build_parser().parse_args(["train", "d", "--out", "o"])
    assert fields <= set(vars(args))


def test_options_reach_the_config_unchanged() -> None:
    from imgcls.cli import build_parser, config_from_args
    from imgcls.config import TrainConfig

    args = build_parser().parse_args(["train", "d", "--out", "o", "--time-budget", "5m", "--no-channels-last",
                                      "--lr", "0.01", "--csv", "labels.csv", "--freeze-stages", "2"])
    config = config_from_args(TrainConfig, args)
    assert config == TrainConfig(data_dir="d", time_budget_s=300.0, channels_last=False, lr=0.01,
                                 csv="labels.csv", freeze_stages=2)
    assert config_from_args(TrainConfig, build_parser().parse_args(["train", "d", "--out", "o"])) == \
        TrainConfig(data_dir="d")


def test_auto_values_parse_and_bad_ones_are_one_line(capsys) -> None:
    from imgcls.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "d", "--out", "o", "--batch-size", "auto", "--epochs", "7",
                                      "--lr", "auto"])
    config = config_from_args(TrainConfig, args)
    assert (config.batch_size, config.epochs, config.lr) == (None, 7, "auto")
    for flag, value in (("--batch-size", "0"), ("--epochs", "many"), ("--lr", "-1"), ("--lr", "fast")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "d", "--out", "o", flag, value])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith(f"imgcls train: error: argument {flag}: ")


def test_a_bad_duration_is_argparse_s_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "d", "--out", "o", "--time-budget", "soon"])
    assert exit_info.value.code == 2
    assert "cannot read duration 'soon'; use e.g. 90s" in capsys.readouterr().err


def test_version(capsys) -> None:
    from imgcls import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"imgcls {__version__}"


def test_csv_names_the_table_when_a_folder_holds_several(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    import shutil

    train = tmp_path / "glyphs"
    shutil.copytree(csv_dataset / "train", train)
    (train / "train.csv").rename(train / "labels.csv")
    (train / "notes.csv").write_text("a,b\n1,2\n")
    assert run_cli("train", train, "--out", tmp_path / "r", "--epochs", "1", *TRAIN_FAST) == 3
    assert "name the one to use with --csv" in capsys.readouterr().err
    assert run_cli("train", train, "--out", tmp_path / "r", "--epochs", "1", "--csv", train / "labels.csv",
                   *TRAIN_FAST) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["csv"] == str(train / "labels.csv")
    assert run_cli("check", train, "--csv", train / "labels.csv", "--report", tmp_path / "report.json") == 0


def test_resume_refuses_when_there_is_no_run(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "typo"
    assert run_cli("train", csv_dataset / "train", "--out", out, "--resume", *TRAIN_FAST) == 4
    assert "no run to resume" in capsys.readouterr().err and not out.exists()
    assert run_cli("train", csv_dataset / "train", "--out", out, "--resume", "--overwrite", *TRAIN_FAST) == 2


def test_a_bad_option_value_is_exit_2_and_a_bug_is_a_traceback(csv_dataset: Path, tmp_path: Path,
                                                                 monkeypatch, capsys) -> None:
    assert run_cli("train", csv_dataset / "train", "--out", tmp_path / "r", "--model", "nope-net") == 2
    assert "unknown model 'nope-net'" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr("imgcls.cli.fit", broken)
    with pytest.raises(ValueError, match="a bug"):
        run_cli("train", csv_dataset / "train", "--out", tmp_path / "r2")
