"""Predictor.from_run(run_dir): everything needed to predict comes from the run folder."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import torch

from imgcls import fileio
from imgcls.config import TTA_MODES
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import iterate_batches, num_batches
from imgcls.data.classes import ClassMap
from imgcls.data.transforms import Preprocess
from imgcls.errors import OptionError, RunFolderError
from imgcls.extras import require
from imgcls.export import LOG_FLOOR, export_onnx, read_sidecar, sidecar_path
from imgcls.runtime import make_runtime
from imgcls.train.loop import predict_logits
from imgcls.train.run_folder import DESCRIPTION_KEYS, RunFolder


ENGINES = ("torch", "onnx")


def mix(member_proba: list[np.ndarray], weights) -> np.ndarray:
    """An ensemble's probabilities: the weighted mean of its members'."""
    weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return sum(w * p.astype(np.float64) for w, p in zip(weights, member_proba)).astype(np.float32)


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise OptionError(f"unknown test-time augmentation {tta!r}; valid: {', '.join(TTA_MODES)}")
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
    classes_file: dict  # classes.json as the run wrote it (class map plus the CSV's column names)
    description: dict  # RunFolder.describe_model(): what the sidecar and the server's /model show
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

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, folder: RunFolder,
                 device: str = "auto", precision: str = "fp32"):
        config = folder.read_config()
        self.runtime = make_runtime(device, precision, channels_last=config.channels_last)
        self.model = model.to(self.runtime.device).eval()
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.folder = folder
        self.config = config
        self.description = folder.describe_model()
        self.model_info = self.description["model"]
        self.classes_file = self.description["classes"]
        self.classes = folder.class_map()

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "auto", precision: str = "fp32") -> "Predictor":
        """The run folder's best model with its preprocessing and classes."""
        folder = RunFolder(run_dir)
        model, preprocess = folder.load_model()
        return cls(model, preprocess, folder, device, precision)

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Raw float32 logits for a uint8 NHWC tensor decoded like the training data."""
        return predict_logits(self.model, iterate_batches(images, None, batch_size),
                              preprocess=self.preprocess, runtime=self.runtime,
                              total=num_batches(len(images), batch_size)).numpy()


class OnnxPredictor(_PredictorBase):
    """An exported graph under ONNX Runtime: same interface as Predictor, no model code needed."""

    def __init__(self, session, meta: dict):
        self.session = session
        self.meta = meta
        self.description = {key: meta.get(key) for key in DESCRIPTION_KEYS}
        self.model_info = meta["model"]
        self.classes = ClassMap.from_json(meta["classes"])
        self.classes_file = meta["classes"]

    @classmethod
    def from_export(cls, onnx_path: str | os.PathLike, threads: int | None = None,
                    optimization: str = "all") -> "OnnxPredictor":
        """Open model.onnx and its sidecar; `optimization` is ONNX Runtime's graph level."""
        ort = require("onnxruntime", "the onnx engine")

        meta = read_sidecar(onnx_path)
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise OptionError(f"unknown optimization level {optimization!r}; valid: {', '.join(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        # Default: as many intra-op threads as torch uses, so the engines compete on equal cores.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            raise RunFolderError(f"{onnx_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
        return cls(session, meta)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kwargs) -> "OnnxPredictor":
        """The run's default ONNX export, exported first when missing or made from other weights."""
        folder = RunFolder(run_dir)
        folder.require_finished()
        onnx_path = folder.export_path("onnx")
        fresh = onnx_path.is_file() and sidecar_path(onnx_path).is_file() and \
            fileio.read_json(sidecar_path(onnx_path)).get("weights_sha256") == folder.weights_sha256()
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


class EnsemblePredictor(_PredictorBase):
    """Members' predictors behind one predict_proba: the weighted mean of their probabilities.

    Test-time augmentation is the ensemble's (its views go through every member), so members
    predict without their own."""

    def __init__(self, folder: RunFolder, members: list[_PredictorBase], weights: list[float]):
        self.folder, self.members = folder, members
        self.weights = [w / float(sum(weights)) for w in weights]
        self.description = folder.describe_model()
        self.model_info = self.description["model"]
        self.classes_file = self.description["classes"]
        self.classes = folder.class_map()

    @classmethod
    def from_folder(cls, run_dir: str | os.PathLike, engine: str = "torch",
                    device: str = "auto") -> "EnsemblePredictor":
        folder = RunFolder(run_dir)
        folder.require_finished()
        ensemble = folder.read_ensemble()
        members = [load_predictor(m, engine, device) for m in ensemble["members"]]
        return cls(folder, members, ensemble["weights"])

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """The log of the mixed probabilities: softmax of it gives them back (see EnsembleModule)."""
        proba = mix([m.predict_proba(images, batch_size) for m in self.members], self.weights)
        return np.log(np.maximum(proba, LOG_FLOOR)).astype(np.float32)


def load_predictor(run_dir: str | os.PathLike, engine: str = "torch", device: str = "auto",
                   tta: str = "none") -> _PredictorBase:
    """A predictor for the run through the chosen engine; an .onnx path opens that export directly."""
    if engine not in ENGINES:
        raise OptionError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    check_tta(tta)  # before the model loads
    if RunFolder(run_dir).is_ensemble():
        predictor = EnsemblePredictor.from_folder(run_dir, engine, device)
    elif engine == "torch":
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
