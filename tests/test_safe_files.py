"""Model and checkpoint files are never unpickled as code: a payload is refused and never runs."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import pytest
import torch

from imgcls.cli import main
from imgcls.errors import WeightsError
from imgcls.predict import Predictor
from imgcls.models.io import read_state_dict
from imgcls.train.checkpoint import load_checkpoint


class Payload:
    """Unpickling this object creates `marker` (stands in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def torch_file_with_payload(path: Path, marker: Path) -> Path:
    """A plausible checkpoint (real tensors) with the payload tucked inside."""
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1, "note": Payload(marker)}, path)
    return path


def raw_pickle_with_payload(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"w": Payload(marker)}))
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Without the safeguards the payload does run: the refusals below are meaningful."""
    marker = tmp_path / "pwned"
    pickle.loads(raw_pickle_with_payload(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("make", [torch_file_with_payload, raw_pickle_with_payload])
def test_loaders_refuse_a_payload(tmp_path: Path, make) -> None:
    marker = tmp_path / "pwned"
    for name in ("checkpoint.pt", "weights.pth", "weights.bin"):
        path = make(tmp_path / name, marker)
        with pytest.raises(WeightsError, match="refused to load"):
            read_state_dict(path)
        with pytest.raises(WeightsError, match="unreadable resume checkpoint"):
            load_checkpoint(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_csv_dataset

    root = tmp_path_factory.mktemp("safe")
    data = make_csv_dataset(root / "ds", n_per_class=6)
    out = root / "run"
    assert main(["train", str(data / "train"), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                 "--precision", "fp32"]) == 0
    return out


@pytest.mark.parametrize("make", [torch_file_with_payload, raw_pickle_with_payload])
def test_predictor_refuses_a_planted_model_file(finished_run: Path, tmp_path: Path, make) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    make(run / "model.safetensors", marker)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        Predictor.from_run(run, device="cpu")
    assert not marker.exists()


def test_resume_refuses_a_planted_checkpoint(finished_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from imgcls.config import TrainConfig

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "run.json").unlink()  # an interrupted run: training resumes from checkpoint.pt
    marker = tmp_path / "pwned"
    torch_file_with_payload(run / "checkpoint.pt", marker)
    config = TrainConfig.from_json(__import__("json").loads((run / "config.json").read_text()))
    code = main(["train", config.data_dir, "--out", str(run), "--epochs", "1", "--batch-size", "8",
                 "--precision", "fp32"])
    assert code == WeightsError.exit_code
    assert "unreadable resume checkpoint" in capsys.readouterr().err
    assert not marker.exists()
