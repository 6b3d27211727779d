"""Run folders for the export and serve tests: a trained tiny CNN, or any module written as a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn

from conftest import make_csv_dataset
from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.data.classes import ClassMap
from imgcls.models.io import save_model
from imgcls.train.run_folder import RunFolder


def train_tiny_run(root: Path, epochs: int = 3) -> tuple[Path, Path]:
    """(run folder, dataset root): scratch-cnn-tiny trained on the synthetic glyphs, fp32."""
    from imgcls.train.runner import fit

    data = make_csv_dataset(root / "ds", n_per_class=16, n_test=30, string_labels=True)
    config = TrainConfig(data_dir=str(data / "train"), model="scratch-cnn-tiny", epochs=epochs,
                         batch_size=16, lr=0.01, precision="fp32", channels_last=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_HOME", str(root / "imgcls_home"))
        fit(config, root / "run", device="cpu", log=lambda _: None)
    return root / "run", data


def write_run_folder(run: Path, name: str, model: nn.Module, labels: list[str], *, in_chans: int,
                     data_channels: int, data_size: tuple[int, int], image_size: tuple[int, int] | None,
                     mean: list[float], std: list[float]) -> Path:
    """A complete run folder around an untrained module, as fit() would have written it."""
    run.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(data_dir="unused", model=name, precision="fp32", channels_last=False)
    fileio.write_json(run / "config.json", config.to_json())
    classes = ClassMap.from_labels(labels)
    fileio.write_json(run / "classes.json", {**classes.to_json(), "id_column": "id", "label_column": "label"})
    info = {"name": name, "in_chans": in_chans, "image_size": list(image_size) if image_size else None,
            "data_channels": data_channels, "data_size": list(data_size), "mean": mean, "std": std}
    fileio.write_json(run / "run.json", {"status": "complete", "config_hash": config.hash(), "model": info})
    save_model(model, run / RunFolder.MODEL)
    return run
