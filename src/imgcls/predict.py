"""Predictor.from_run(run_dir): everything needed to predict comes from the run folder."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch

from imgcls import fileio
from imgcls.config import TTA_MODES, TrainConfig
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import iterate_batches, num_batches
from imgcls.data.classes import ClassMap
from imgcls.data.transforms import Preprocess
from imgcls.errors import RunFolderError
from imgcls.models import create_model
from imgcls.runtime import make_runtime
from imgcls.train.checkpoint import MODEL_FILE, read_state_dict, sha256_file
from imgcls.train.loop import predict_logits


ENGINES = ("torch", "onnx")


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; valid: {', '.join(TTA_MODES)}")
    return tta


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The inputs whose predictions are averaged: the images, plus their mirror images for 'flip'.

    Flip only suits classes that look the same mirrored (clothes, animals; not digits or text),
    which is also when training used flip augmentation, so it is opt-in.
    """
    check_tta(tta)
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    return [images] if tta == "none" else [images, images.flip(2)]  # NHWC: dim 2 is the width


class _PredictorBase:
    """What every engine shares: decoding data the way training did, and argmax over predict_proba."""

    model_info: dict
    classes: ClassMap
    tta: str = "none"  # test-time augmentation for predict_proba / predict (TTA_MODES)

    @property
    def data_layout(self) -> tuple[int, tuple[int, int]]:
        """Channels and size the images are decoded to (as in training)."""
        return self.model_info["data_channels"], tuple(self.model_info["data_size"])

    def load(self, data_dir: str | os.PathLike, **kwargs) -> Dataset:
        channels, size = self.data_layout
        return load_dataset(data_dir, require_labels=False, classes=kwargs.pop("classes", None),
                            channels=channels, size=size, resize=self.resize_policy, **kwargs)

    @property
    def resize_policy(self) -> str:
        """How the run fitted images of another shape (runs from before the option squashed them)."""
        return self.model_info.get("resize", "squash")

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Class probabilities for a uint8 NHWC tensor decoded like the training data,
        averaged over the test-time augmentation views (self.tta)."""
        views = tta_views(images, self.tta)
        return sum(torch.softmax(torch.from_numpy(self.predict_logits(v, batch_size)), 1).numpy()
                   for v in views) / len(views)

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        return self.predict_proba(images, batch_size).argmax(1)

    @property
    def label_column(self) -> str:
        """The label column's name in train.csv, so the submission header matches it."""
        return self.classes_file.get("label_column") or "label"


class Predictor(_PredictorBase):
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
    def classes_file(self) -> dict:
        return fileio.read_json(self.run_dir / "classes.json") if self.run_dir else {}

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Raw float32 logits for a uint8 NHWC tensor decoded like the training data."""
        return predict_logits(self.model, iterate_batches(images, None, batch_size),
                              preprocess=self.preprocess, runtime=self.runtime,
                              total=num_batches(len(images), batch_size)).numpy()


class OnnxPredictor(_PredictorBase):
    """An exported graph under ONNX Runtime: same interface as Predictor, no model code needed."""

    def __init__(self, session, meta: dict, run_dir: Path | None = None):
        self.session = session
        self.meta = meta
        self.model_info = meta["model"]
        self.classes = ClassMap.from_json(meta["classes"])
        self.classes_file = meta["classes"]
        self.run_dir = run_dir

    @classmethod
    def from_export(cls, onnx_path: str | os.PathLike, threads: int | None = None,
                    optimization: str = "all") -> "OnnxPredictor":
        """Open model.onnx and its sidecar; `optimization` is ONNX Runtime's graph level."""
        import onnxruntime as ort

        from imgcls.export import read_sidecar

        meta = read_sidecar(onnx_path)
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"unknown optimization level {optimization!r}; valid: {', '.join(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        # Default: as many intra-op threads as torch uses, so the engines compete on equal cores.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise RunFolderError(f"{onnx_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        run_dir = Path(meta["source_run"]) if meta.get("source_run") else None
        return cls(session, meta, run_dir)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kwargs) -> "OnnxPredictor":
        """Use run_dir/model.onnx, exporting it first when missing or older than model.safetensors."""
        from imgcls.export import export_onnx, sidecar_path

        run_dir = Path(run_dir)
        onnx_path = run_dir / "model.onnx"
        weights = run_dir / MODEL_FILE
        fresh = onnx_path.is_file() and sidecar_path(onnx_path).is_file() and weights.is_file() and \
            fileio.read_json(sidecar_path(onnx_path)).get("weights_sha256") == sha256_file(weights)
        if not fresh:
            export_onnx(run_dir, onnx_path)
        return cls.from_export(onnx_path, **kwargs)

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Raw logits; the graph takes the decoded uint8 NHWC pixels as they are."""
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        outputs = [self.session.run(["logits"], {"images": np.ascontiguousarray(array[i:i + batch_size])})[0]
                   for i in range(0, len(array), batch_size)]
        num_classes = self.classes.num_classes
        return np.concatenate(outputs) if outputs else np.empty((0, num_classes), np.float32)


def load_predictor(run_dir: str | os.PathLike, engine: str = "torch", device: str = "auto",
                   tta: str = "none") -> _PredictorBase:
    """A predictor for the run through the chosen engine; an .onnx path opens that export directly."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    check_tta(tta)  # before the model loads
    if engine == "torch":
        predictor = Predictor.from_run(run_dir, device)
    elif Path(run_dir).suffix == ".onnx":
        predictor = OnnxPredictor.from_export(run_dir)
    else:
        predictor = OnnxPredictor.from_run(run_dir)
    predictor.tta = tta
    return predictor


def write_submission(path: str | os.PathLike, ids: list[str], labels: list, id_column: str = "id",
                     label_column: str = "label") -> None:
    """One row per id in the given order; labels as train.csv had them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([id_column, label_column])
    writer.writerows(zip(ids, labels))
    fileio.write_text(path, buffer.getvalue())


def predict_folder(run_dir: str | os.PathLike, test_dir: str | os.PathLike, out: str | os.PathLike,
                   device: str = "auto", batch_size: int = 512, engine: str = "torch", tta: str = "none") -> dict:
    """Predict every image of a test folder into a submission CSV in test.csv order."""
    predictor = load_predictor(run_dir, engine, device, tta)
    data = predictor.load(test_dir)
    indices = predictor.predict(data.images, batch_size)
    labels = predictor.classes.decode(indices)
    write_submission(out, data.ids, labels, data.table.id_column, predictor.label_column)
    return {"rows": len(data.ids), "out": str(out), "quarantined": len(data.bad)}
