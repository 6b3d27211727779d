"""A missing optional package is one line naming the pip install that brings it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deploy_support import train_tiny_run
from imgcls.cli import main
from imgcls.extras import MissingExtraError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("extras"))[0]


@pytest.mark.parametrize("hidden, argv, extra", [
    ("fastapi", ["serve", "{run}"], "serve"),
    ("uvicorn", ["serve", "{run}"], "serve"),
    ("onnx", ["export", "{run}"], "export"),
    ("onnxruntime", ["predict", "{run}", "{run}", "--out", "{run}/x.csv", "--engine", "onnx"], "export"),
])
def test_a_missing_extra_names_its_install_command(run: Path, monkeypatch, capsys, hidden, argv, extra) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)  # importing it now raises ImportError
    code = main([a.format(run=run) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == MissingExtraError.exit_code
    assert len(err.splitlines()) == 1 and f"pip install 'imgcls[{extra}]'" in err and repr(hidden) in err


def test_tensorboard_logs_every_epoch_and_its_absence_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import make_csv_dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_csv_dataset(tmp_path / "ds") / "train"
    argv = ["train", str(data), "--model", "scratch-cnn-tiny", "--epochs", "2", "--batch-size", "16",
            "--precision", "fp32", "--log", "tensorboard"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert {"loss/train", "loss/val", "accuracy/val", "lr", "images_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/train")] == [1, 2]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2  # the record either way
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main([*argv, "--out", str(tmp_path / "run2")]) == MissingExtraError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'imgcls[tensorboard]'" in err
