"""RunFolder readers: a missing, unreadable or wrongly shaped file is one line naming it, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imgcls.cli import main
from imgcls.errors import RunFolderError
from imgcls.models import create_model
from imgcls.models.io import save_model
from imgcls.predict import Predictor
from imgcls.train.run_folder import RunFolder

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A finished run folder (copied from the legacy fixture) and its test data next to it."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    return tmp_path / "legacy" / "complete"


def refusal(run: Path) -> str:
    with pytest.raises(RunFolderError) as info:
        Predictor.from_run(run, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_file_is_named(run: Path) -> None:
    (run / "classes.json").unlink()
    assert refusal(run) == f"{run}: not a finished run folder (missing classes.json)"


@pytest.mark.parametrize("name, text, expected", [
    ("classes.json", '{"labels": [', "classes.json: not valid JSON (Expecting value at line 1 column 13)"),
    ("classes.json", '["0", "1", "2"]', "classes.json: expected an object, found a list"),
    ("classes.json", '{"labels": ["0", "1"], "integer_labels": true}', "classes.json: not the file a run writes (no 'names')"),
    ("classes.json", '{"labels": ["0", "1"], "names": ["a"], "integer_labels": true}',
     "classes.json: labels and names must be lists of the same length"),
    ("run.json", '"complete"', "run.json: expected an object, found a string"),
    ("run.json", '{"status": "complete", "model": {"name": "scratch-cnn-tiny"}}',
     "run.json: its model record lacks in_chans"),
    ("config.json", '{"model": "scratch-cnn-tiny"}', "config.json: not the file a run writes (no 'data_dir')"),
    ("config.json", '{"data_dir": "d", "model": "m"', "config.json: not valid JSON"),
])
def test_a_broken_file_is_one_line_naming_it(run: Path, name: str, text: str, expected: str) -> None:
    (run / name).write_text(text)
    message = refusal(run)
    assert message.startswith(str(run / name)) and expected in message


def test_weights_of_another_shape_are_one_line(run: Path) -> None:
    save_model(create_model("scratch-cnn-tiny", num_classes=5, in_chans=1), run / "model.safetensors")
    message = refusal(run)
    assert message.startswith(f"{run / 'model.safetensors'}: weights do not fit") and "size mismatch for" in message


def test_the_cli_exits_4_with_the_line(run: Path, tmp_path: Path, capsys) -> None:
    (run / "run.json").write_text("[]")
    data = run.parent / "data" / "test"
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 4
    err = capsys.readouterr().err.strip()
    assert err == f"imgcls: error: {run / 'run.json'}: expected an object, found a list"


def test_a_torn_metrics_line_is_named(run: Path) -> None:
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n{\"epoch\": 2\n")
    with pytest.raises(RunFolderError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        RunFolder(run).read_metrics()


def test_a_checkpoint_without_resume_state_is_refused(run: Path) -> None:
    import torch

    torch.save({"model": {}}, run / "checkpoint.pt")
    with pytest.raises(RunFolderError, match=r"checkpoint.pt: not a resume checkpoint \(no optimizer, epoch"):
        RunFolder(run).read_checkpoint()


def test_every_written_file_is_listed(run: Path) -> None:
    """--overwrite removes written_files(): a file name the folder writes but does not list would survive."""
    names = {value for key, value in vars(RunFolder).items() if key.isupper() and isinstance(value, str)
             and key != "SIDECAR_SUFFIX"}
    assert names <= set(RunFolder.written_files())
    assert set(RunFolder.EXPORTS.values()) <= set(RunFolder.written_files())
