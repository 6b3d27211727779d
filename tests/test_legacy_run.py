"""Run folders written before the run-folder type existed still load, predict, evaluate, export and resume.

tests/fixtures/legacy_run holds two folders trained by that older code (scratch-cnn-tiny, 16 px, 3 classes):
complete/ (1 epoch, finished) and incomplete/ (stopped after epoch 1 of 2), with their data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from imgcls import fileio
from imgcls.cli import main
from imgcls.evaluate.scoring import evaluate_run
from imgcls.export import export_run
from imgcls.predict import OnnxPredictor, Predictor, predict_folder

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
# What the older code predicted for data/test (recorded when the fixture was made).
EXPECTED_PROBA = np.array([
    [0.29202, 0.33751, 0.37047], [0.29180, 0.33756, 0.37064], [0.29196, 0.33744, 0.37060],
    [0.29198, 0.33758, 0.37044], [0.29163, 0.33769, 0.37068], [0.29199, 0.33719, 0.37082]])
TRAIN = ["train", "data/train", "--model", "scratch-cnn-tiny", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy; config.json names data/train relative to it, so work from inside it."""
    root = tmp_path / "legacy_run"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def test_predicts_what_the_older_code_predicted(legacy: Path) -> None:
    predictor = Predictor.from_run("complete", device="cpu")
    data = predictor.load("data/test")
    np.testing.assert_allclose(predictor.predict_proba(data.images), EXPECTED_PROBA, atol=1e-4)
    result = predict_folder("complete", "data/test", "submission.csv", device="cpu")
    assert result["rows"] == 6
    assert (legacy / "submission.csv").read_text().splitlines()[:2] == ["id,label", "te0000,2"]


def test_evaluates_against_the_answer_key(legacy: Path) -> None:
    metrics = evaluate_run("complete", "data/test", "data/test_labels.csv", device="cpu")
    assert metrics["count"] == 6 and metrics["accuracy"] == pytest.approx(2 / 6)
    assert fileio.read_json(legacy / "complete" / "eval.json")["accuracy"] == metrics["accuracy"]
    assert (legacy / "complete" / "confusion.csv").is_file()


def test_exports_to_onnx_with_the_same_predictions(legacy: Path) -> None:
    result = export_run("complete")
    onnx = OnnxPredictor.from_export(result["path"])
    data = onnx.load("data/test")
    np.testing.assert_allclose(onnx.predict_proba(data.images), EXPECTED_PROBA, atol=1e-4)
    assert result["config_hash"] == fileio.read_json(legacy / "complete" / "run.json")["config_hash"]


def test_a_complete_run_is_not_retrained(legacy: Path, capsys) -> None:
    before = (legacy / "complete" / "model.safetensors").read_bytes()
    assert main([*TRAIN, "--out", "complete", "--epochs", "1"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (legacy / "complete" / "model.safetensors").read_bytes() == before


def test_a_different_run_is_refused(legacy: Path, capsys) -> None:
    assert main([*TRAIN, "--out", "complete", "--epochs", "1", "--lr", "0.01"]) == 4
    assert "holds a different run" in capsys.readouterr().err


def test_an_interrupted_run_resumes_from_its_checkpoint(legacy: Path, capsys) -> None:
    assert main([*TRAIN, "--out", "incomplete", "--epochs", "2"]) == 0
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    run = fileio.read_json(legacy / "incomplete" / "run.json")
    assert run["status"] == "complete" and run["epochs"] == 2
    assert [h["epoch"] for h in fileio.read_jsonl(legacy / "incomplete" / "metrics.jsonl")] == [1, 2]
