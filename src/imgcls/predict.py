"""Predictor.from_run(run_dir): everything needed to predict comes from the run folder."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch

from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import iterate_batches, num_batches
from imgcls.data.classes import ClassMap
from imgcls.data.transforms import Preprocess
from imgcls.errors import RunFolderError
from imgcls.models import create_model
from imgcls.runtime import make_runtime
from imgcls.train.checkpoint import MODEL_FILE, read_state_dict
from imgcls.train.loop import predict_logits


class Predictor:
    """A trained model with its preprocessing and class map; predict / predict_proba like scikit-learn."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, classes: ClassMap,
                 model_info: dict, config: TrainConfig, run_dir: Path | None = None,
                 device: str = "auto", precision: str = "fp32"):
        self.runtime = make_runtime(device, precision, channels_last=config.channels_last)
        self.model = model.to(self.runtime.device).eval()
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.classes = classes
        self.model_info = model_info
        self.config = config
        self.run_dir = run_dir

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "auto", precision: str = "fp32") -> "Predictor":
        """Rebuild the model from config.json / run.json / classes.json and load model.safetensors."""
        run_dir = Path(run_dir)
        for name in ("config.json", "classes.json", "run.json", MODEL_FILE):
            if not (run_dir / name).exists():
                raise RunFolderError(f"{run_dir}: not a finished run folder (missing {name})")
        config = TrainConfig.from_json(fileio.read_json(run_dir / "config.json"))
        classes = ClassMap.from_json(fileio.read_json(run_dir / "classes.json"))
        info = fileio.read_json(run_dir / "run.json")["model"]
        model = create_model(info["name"], num_classes=classes.num_classes, in_chans=info["in_chans"],
                             **info.get("kwargs", {}))
        model.load_state_dict(read_state_dict(run_dir / MODEL_FILE))
        preprocess = Preprocess(tuple(info["mean"]), tuple(info["std"]), info["in_chans"],
                                tuple(info["image_size"]) if info["image_size"] else None)
        return cls(model, preprocess, classes, info, config, run_dir, device, precision)

    @property
    def data_layout(self) -> tuple[int, tuple[int, int]]:
        """Channels and size the images are decoded to (as in training)."""
        return self.model_info["data_channels"], tuple(self.model_info["data_size"])

    def load(self, data_dir: str | os.PathLike, **kwargs) -> Dataset:
        channels, size = self.data_layout
        return load_dataset(data_dir, require_labels=False, classes=kwargs.pop("classes", None),
                            channels=channels, size=size, **kwargs)

    def predict_proba(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Class probabilities for a uint8 NHWC tensor decoded like the training data."""
        logits = predict_logits(self.model, iterate_batches(images, None, batch_size),
                                preprocess=self.preprocess, runtime=self.runtime,
                                total=num_batches(len(images), batch_size))
        return torch.softmax(logits, 1).numpy()

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        return self.predict_proba(images, batch_size).argmax(1)


def write_submission(path: str | os.PathLike, ids: list[str], labels: list, id_column: str = "id",
                     label_column: str = "label") -> None:
    """One row per id in the given order; labels as train.csv had them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([id_column, label_column])
    writer.writerows(zip(ids, labels))
    fileio.write_text(path, buffer.getvalue())


def predict_folder(run_dir: str | os.PathLike, test_dir: str | os.PathLike, out: str | os.PathLike,
                   device: str = "auto", batch_size: int = 512) -> dict:
    """Predict every image of a test folder into a submission CSV in test.csv order."""
    predictor = Predictor.from_run(run_dir, device)
    data = predictor.load(test_dir)
    indices = predictor.predict(data.images, batch_size)
    labels = predictor.classes.decode(indices)
    label_column = fileio.read_json(Path(run_dir) / "classes.json").get("label_column", "label")
    write_submission(out, data.ids, labels, data.table.id_column, label_column)
    return {"rows": len(data.ids), "out": str(out), "quarantined": len(data.bad)}
