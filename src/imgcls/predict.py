"""Predictor.from_run(run_dir): everything needed to predict comes from the run folder."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls import engines, fileio
from imgcls.config import TTA_MODES
from imgcls.data import Dataset, load_dataset
from imgcls.data.batches import iterate_batches, num_batches
from imgcls.data.classes import ClassMap
from imgcls.data.source import ImageSource
from imgcls.data.images import load_image
from imgcls.data.table import IMAGE_EXTENSIONS, find_csv, outside_reason
from imgcls.data.transforms import Preprocess
from imgcls.errors import DataError, OptionError
from imgcls.export import (LOG_FLOOR, export_int8, fresh_onnx, int8_suits_this_cpu, is_fresh, onnx_session,
                           read_sidecar, run_onnx)
from imgcls.runtime import make_runtime
from imgcls.train.loop import predict_logits
from imgcls.train.run_folder import DESCRIPTION_KEYS, RunFolder


ENGINES = engines.ENGINES
# Images of a source predicted per chunk: bounded memory (the test-time flip copies its input).
PREDICT_CHUNK_IMAGES = 4096


def mix(member_proba: list[np.ndarray], weights) -> np.ndarray:
    """An ensemble's probabilities: the weighted mean of its members'."""
    weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return sum(w * p.astype(np.float64) for w, p in zip(weights, member_proba)).astype(np.float32)


def check_tta(tta: str) -> str:
    if tta not in TTA_MODES:
        raise OptionError(f"unknown test-time augmentation {tta!r}; valid: {', '.join(TTA_MODES)}")
    return tta


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The inputs whose predictions are averaged: the images, plus their mirror images for 'flip',
    plus for 'flip-shift' both of those moved one pixel down-right and one up-left (six views, the
    multi-crop evaluation of the fast CIFAR-10 recipes; borders repeat the edge pixels).

    Flip only suits classes that look the same mirrored (clothes, animals; not digits or text),
    which is also when training used flip augmentation, so it is opt-in.
    """
    check_tta(tta)
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if tta == "none":
        return [images]
    placed = [images] if tta == "flip" else [images, _shifted(images, 1), _shifted(images, -1)]
    return [view for image in placed for view in (image, image.flip(2))]  # NHWC: dim 2 is the width


def _shifted(images: torch.Tensor, by: int) -> torch.Tensor:
    """NHWC images moved `by` pixels down and right (up and left when negative), edges repeated."""
    height, width = images.shape[1], images.shape[2]
    rows = (torch.arange(height) - by).clamp(0, height - 1)
    cols = (torch.arange(width) - by).clamp(0, width - 1)
    return images[:, rows][:, :, cols]


class _PredictorBase:
    """What every engine shares: decoding data the way training did, and argmax over predict_proba."""

    model_info: dict
    classes: ClassMap
    classes_file: dict  # classes.json as the run wrote it (class map plus the CSV's column names)
    description: dict  # RunFolder.describe_model(): what the sidecar and the server's /model show
    tta: str = "none"  # test-time augmentation for predict_proba / predict (TTA_MODES)
    engine: str = "torch"  # the engine name (engines.ENGINES) it was loaded as

    @property
    def data_layout(self) -> tuple[int, tuple[int, int]]:
        """Channels and size the images are decoded to (as in training)."""
        return self.model_info["data_channels"], tuple(self.model_info["data_size"])

    def load(self, data_dir: str | os.PathLike, **kwargs) -> Dataset:
        channels, size = self.data_layout
        return load_dataset(data_dir, require_labels=False, classes=kwargs.pop("classes", None),
                            channels=channels, size=size, resize=self.resize_policy, **kwargs)

    def load_files(self, paths: list[Path]) -> torch.Tensor:
        """Image files decoded the way the training data was (one uint8 NHWC batch)."""
        channels, size = self.data_layout
        return torch.from_numpy(np.stack([load_image(p, channels, size, policy=self.resize_policy) for p in paths]))

    @property
    def resize_policy(self) -> str:
        """How the run fitted images of another shape (runs from before the option squashed them)."""
        return self.model_info.get("resize", "squash")

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        raise NotImplementedError

    def predict_proba(self, images: torch.Tensor | ImageSource, batch_size: int = 512) -> np.ndarray:
        """Class probabilities for a uint8 NHWC tensor decoded like the training data,
        averaged over the test-time augmentation views (self.tta). A source (a dataset) is read a
        chunk of whole batches at a time, so memory stays bounded however many images it has."""
        if isinstance(images, ImageSource):
            chunk = batch_size * max(1, PREDICT_CHUNK_IMAGES // batch_size)
            parts = [self.predict_proba(part, batch_size) for part, _ in iterate_batches(images, None, chunk)]
            return np.concatenate(parts) if parts else np.zeros((0, self.classes.num_classes), np.float32)
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

    engine = "onnx"

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
        meta = read_sidecar(onnx_path)
        return cls(onnx_session(onnx_path, threads, optimization), meta)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, **kwargs) -> "OnnxPredictor":
        """The run's default ONNX export, exported first when missing or made from other weights."""
        return cls.from_export(fresh_onnx(run_dir), **kwargs)

    @classmethod
    def from_run_int8(cls, run_dir: str | os.PathLike, **kwargs) -> "OnnxPredictor":
        """The run's int8 graph, quantised first when missing, made from other weights or for another
        CPU's int8 kernels (refused when it would lose more validation accuracy than
        export.MAX_INT8_ACCURACY_LOSS)."""
        folder = RunFolder(run_dir)
        path = folder.export_path("onnx-int8")
        if not is_fresh(folder, path) or not int8_suits_this_cpu(path):
            export_int8(run_dir, path)
        return cls.from_export(path, **kwargs)

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """Raw logits; the graph takes the decoded uint8 NHWC pixels as they are."""
        return run_onnx(self.session, images, batch_size, self.classes.num_classes)


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
    def from_folder(cls, run_dir: str | os.PathLike, engine: str = "torch", device: str = "auto",
                    serving_batch: int | None = None) -> "EnsemblePredictor":
        folder = RunFolder(run_dir)
        folder.require_finished()
        ensemble = folder.read_ensemble()
        members = [load_predictor(m, engine, device, serving_batch=serving_batch) for m in ensemble["members"]]
        return cls(folder, members, ensemble["weights"])

    def predict_logits(self, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """The log of the mixed probabilities: softmax of it gives them back (see EnsembleModule)."""
        proba = mix([m.predict_proba(images, batch_size) for m in self.members], self.weights)
        return np.log(np.maximum(proba, LOG_FLOOR)).astype(np.float32)


def engine_factories(run_dir: str | os.PathLike, device: str = "auto") -> dict[str, Callable[[], _PredictorBase]]:
    """How each engine's predictor for the run is built (engines.auto_engine measures them)."""
    return {"torch": lambda: Predictor.from_run(run_dir, device, "fp32"),
            "torch-bf16": lambda: Predictor.from_run(run_dir, device, "bf16"),
            "onnx": lambda: OnnxPredictor.from_run(run_dir),
            "onnx-int8": lambda: OnnxPredictor.from_run_int8(run_dir)}


def load_predictor(run_dir: str | os.PathLike, engine: str = "torch", device: str = "auto", tta: str = "none",
                   threads: int | None = None, log: Callable[[str], None] | None = None,
                   serving_batch: int | None = None) -> _PredictorBase:
    """A predictor for the run through the chosen engine ('auto': the fastest measured within
    tolerance, see engines.py; with `serving_batch`, fastest over a server's batches of 1 to that
    many images); an .onnx path opens that export directly. `threads`: intra-op threads of torch
    and ONNX Runtime (default: torch's, one per core)."""
    engines.check_engine(engine)
    check_tta(tta)  # before the model loads
    if threads:
        torch.set_num_threads(threads)  # ONNX Runtime sessions take torch's count (export.onnx_session)
    if RunFolder(run_dir).is_ensemble():  # each member through the engine asked for
        predictor = EnsemblePredictor.from_folder(run_dir, engine, device, serving_batch)
    elif Path(run_dir).suffix == ".onnx" and engine in ("auto", "onnx", "onnx-int8"):
        predictor, engine = OnnxPredictor.from_export(run_dir), "onnx"
    elif engine == "auto":
        predictor, record = engines.auto_engine(run_dir, engine_factories(run_dir, device), device, log=log,
                                                serving_batch=serving_batch)
        engine = record["engine"]
    else:
        predictor = engine_factories(run_dir, device)[engine]()
    predictor.engine = engine
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


def write_top_k(path: str | os.PathLike, ids: list[str], proba: np.ndarray, classes: ClassMap, k: int,
                id_column: str = "id", label_column: str = "label") -> None:
    """One row per id: the k most probable classes, best first, each with its probability
    (label, probability, label_2, probability_2, ...: the first two columns are the prediction)."""
    if k < 1:
        raise OptionError(f"--top-k {k}: must be at least 1")
    k = min(k, classes.num_classes)
    best = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    header = [id_column]
    for rank in range(1, k + 1):
        suffix = "" if rank == 1 else f"_{rank}"
        header += [label_column + suffix, "probability" + suffix]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for image_id, row, picks in zip(ids, proba, best):
        labels = classes.decode(picks)
        writer.writerow([image_id, *(x for label, i in zip(labels, picks) for x in (label, f"{row[i]:.6f}"))])
    fileio.write_text(path, buffer.getvalue())


def is_dataset(folder: Path) -> bool:
    """A folder with a CSV (or an images/ folder beside one): predicted in the CSV's order."""
    return find_csv(folder) is not None or (folder / "images").is_dir()


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name; links out of it are refused."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    root = folder.resolve()
    for path in files:
        reason = outside_reason(path, root) if path.is_symlink() else None
        if reason is not None:
            raise DataError(reason)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) and no CSV")
    return files


def loose_files(target: Path) -> list[Path]:
    """An image file, or the images directly in a folder without a CSV, sorted by name."""
    if target.is_file():
        if target.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{target}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [target]
    if not target.is_dir():
        raise DataError(f"{target}: no such image file or folder")
    return image_files(target)


def predict_folder(run_dir: str | os.PathLike, test_dir: str | os.PathLike, out: str | os.PathLike,
                   device: str = "auto", batch_size: int = 512, engine: str = "torch", tta: str = "none",
                   top_k: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Predict a test folder into a submission CSV in test.csv order, or an image file / a folder of
    loose images (no CSV) into one row per image, by file name; top_k: the k best classes each."""
    predictor = load_predictor(run_dir, engine, device, tta, log=log)
    target = Path(test_dir)
    if target.is_dir() and is_dataset(target):
        data = predictor.load(target)
        ids, images, id_column, quarantined = data.ids, data.source, data.table.id_column, len(data.bad)
    else:
        files = loose_files(target)
        ids, images, id_column, quarantined = [p.name for p in files], predictor.load_files(files), "id", 0
    proba = predictor.predict_proba(images, batch_size)
    if top_k is None:
        write_submission(out, ids, predictor.classes.decode(proba.argmax(1)), id_column, predictor.label_column)
    else:
        write_top_k(out, ids, proba, predictor.classes, top_k, id_column, predictor.label_column)
    return {"rows": len(ids), "out": str(out), "quarantined": quarantined, "engine": predictor.engine}
