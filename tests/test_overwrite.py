"""--overwrite replaces only what imgcls wrote: never a plain file, a foreign folder or a user's file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgcls import fileio
from imgcls.cli import main
from imgcls.train.run_folder import RunFolder


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(data / "train"), "--out", str(out), "--model", "scratch-cnn-tiny",
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_plain_file_as_out_is_never_deleted(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "predictions.csv"
    target.write_text("id,label\na,1\n")
    assert train(csv_dataset, target, "--overwrite") == 4
    assert target.read_text() == "id,label\na,1\n"
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("config", [{"learning_rate": 1}, {"data_dir": "x", "model": "m", "strategy": "s",
                                                            "seed": 0}])
def test_a_foreign_folder_with_a_config_json_is_kept(csv_dataset: Path, tmp_path: Path, config, capsys) -> None:
    """Even a config.json that reads as a TrainConfig is no proof without the other files of a run."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    assert train(csv_dataset, folder, "--overwrite") == 4
    assert snapshot(folder) == before
    assert "not a run folder written by imgcls" in capsys.readouterr().err


def test_a_foreign_folder_is_kept(csv_dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").write_bytes(b"not really")
    before = snapshot(folder)
    assert train(csv_dataset, folder, "--overwrite") == 4
    assert snapshot(folder) == before


def test_a_run_folder_is_replaced(csv_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(csv_dataset, out) == 0
    assert RunFolder(out).is_run_folder()
    assert train(csv_dataset, out, "--lr", "0.01") == 4  # a different run is refused without --overwrite
    assert train(csv_dataset, out, "--lr", "0.01", "--overwrite") == 0
    assert fileio.read_json(out / "config.json")["lr"] == 0.01
    assert fileio.read_json(out / "run.json")["status"] == "complete"
    assert [h["epoch"] for h in fileio.read_jsonl(out / "metrics.jsonl")] == [1]  # a fresh run, not appended


def test_a_user_file_inside_a_run_folder_survives(csv_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(csv_dataset, out) == 0
    (out / "notes.md").write_text("why I ran this")
    (out / "plots").mkdir()
    (out / "plots" / "mine.png").write_bytes(b"png")
    assert train(csv_dataset, out, "--seed", "1", "--overwrite") == 0
    assert (out / "notes.md").read_text() == "why I ran this"
    assert (out / "plots" / "mine.png").read_bytes() == b"png"
    assert fileio.read_json(out / "config.json")["seed"] == 1
    written = {p.name for p in out.iterdir()} - {"notes.md", "plots"}
    assert written <= set(RunFolder.written_files())
