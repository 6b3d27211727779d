"""The Python API: from a folder of labelled images to predictions in three lines.

    import imgcls
    model = imgcls.train("data/train", out="runs/first")
    model.predict("data/test/images")          # labels as train.csv wrote them

`Model` answers like a scikit-learn classifier (`predict`, `predict_proba`, `classes_`) for anything
that holds images: a file path, a list of paths, a folder (a dataset with a CSV, or loose images),
a PIL image, or a numpy array / torch tensor of one image or a batch, of any size and channel count.
Every input is decoded and resized the way the training data was, so the model sees the same pixels.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from PIL import Image

from imgcls.config import TrainConfig
from imgcls.data.images import decode_pixels, load_image
from imgcls.data.source import ImageSource
from imgcls.errors import DataError, OptionError
from imgcls.evaluate.scoring import evaluate_run
from imgcls.predict import image_files, is_dataset, load_predictor
from imgcls.train.auto import resolve_sizes
from imgcls.train.lr_find import LrFinding
from imgcls.train.runner import fit, prepare, range_test

PathLike = str | os.PathLike


def train(train_dir: PathLike, out: PathLike, *, overwrite: bool = False, device: str = "auto",
          log: Callable[[str], None] = print, **options: Any) -> "Model":
    """Train (or resume) a run into `out` and return its best model; options are TrainConfig's fields."""
    fit(train_config(train_dir, options), out, overwrite=overwrite, device=device, log=log)
    return load(out, device=device)


def lr_find(train_dir: PathLike, *, device: str = "auto", **options: Any) -> LrFinding:
    """The learning-rate range test of the run these training options would make (fastai's lr_find):
    the rates tried, their smoothed losses and the suggested rate."""
    config = train_config(train_dir, options)
    prepared = prepare(config, device)
    return range_test(resolve_sizes(config, len(prepared.train_idx)), prepared)


def train_config(train_dir: PathLike, options: dict) -> TrainConfig:
    """TrainConfig from keyword options, refusing unknown names with the list of valid ones."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"data_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return TrainConfig(data_dir=str(train_dir), **options)


def load(run_dir: PathLike, *, device: str = "auto", engine: str = "torch", tta: str = "none") -> "Model":
    """The model of a finished run folder (or an exported .onnx with engine='onnx')."""
    return Model(load_predictor(run_dir, engine=engine, device=device, tta=tta), Path(run_dir))


class Model:
    """A trained classifier with its preprocessing and class labels."""

    def __init__(self, predictor, run_dir: Path):
        self.predictor = predictor
        self.run_dir = run_dir

    @property
    def classes_(self) -> list:
        """Class labels in the order of predict_proba's columns, as train.csv wrote them (ints stay ints)."""
        return self.predictor.classes.decode(range(self.predictor.classes.num_classes))

    classes = classes_

    @property
    def class_names(self) -> list[str]:
        """Readable names (from classes.json when the dataset has one), in the same order."""
        return list(self.predictor.classes.names)

    def predict_proba(self, x: Any, batch_size: int = 256) -> np.ndarray:
        """(N, classes) probabilities, rows summing to 1, in the order of `classes_`."""
        return self.predictor.predict_proba(self.images(x), batch_size)

    def predict(self, x: Any, batch_size: int = 256) -> list:
        """One label per image, as train.csv wrote labels."""
        return self.predictor.classes.decode(self.predict_proba(x, batch_size).argmax(1))

    def evaluate(self, test_dir: PathLike, labels: PathLike | None = None) -> dict:
        """Accuracy, macro-F1, per-class scores and the confusion matrix on a labelled folder or an answer key."""
        return evaluate_run(self.run_dir, test_dir, labels, tta=self.predictor.tta)

    def images(self, x: Any) -> torch.Tensor | ImageSource:
        """Any supported input -> uint8 NHWC tensor (a dataset: its source) laid out like the training data."""
        if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
            return self._folder_images(Path(x))
        return self._stack(as_items(x))

    def _folder_images(self, folder: Path) -> torch.Tensor | ImageSource:
        if is_dataset(folder):
            return self.predictor.load(folder).source  # decoded through the cache
        return self.predictor.load_files(image_files(folder))

    def _stack(self, items: Iterable) -> torch.Tensor:
        channels, size = self.predictor.data_layout
        policy = self.predictor.resize_policy
        return torch.from_numpy(np.stack([conform(item, channels, size, policy) for item in items]))

    def __repr__(self) -> str:
        info = self.predictor.model_info
        size = "x".join(map(str, info["image_size"])) if info.get("image_size") else "native size"
        shown = ", ".join(map(str, self.class_names[:5])) + (", ..." if len(self.class_names) > 5 else "")
        return (f"imgcls.Model({info['name']}, {len(self.class_names)} classes [{shown}], "
                f"input {size}, run {str(self.run_dir)!r})")


def as_items(x: Any) -> Iterable:
    """Split an input into single images: paths, PIL images or HxWxC arrays."""
    if isinstance(x, (str, os.PathLike, Image.Image)):
        return [x]
    if isinstance(x, torch.Tensor):
        x = channels_last(x.detach().cpu()).numpy()
    if isinstance(x, np.ndarray):
        if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3, 4)):
            return [x]
        if x.ndim in (3, 4):  # N x H x W (grey) or N x H x W x C
            return list(x)
        raise DataError(f"cannot read an array of shape {x.shape} as images (use HxW, HxWxC or NxHxWxC)")
    if isinstance(x, (list, tuple)):
        return [item for part in x for item in as_items(part)]
    raise DataError(f"cannot read {type(x).__name__} as images: give paths, a folder, PIL images or arrays")


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """Tensors in PyTorch's CxHxW / NxCxHxW order become HxWxC / NxHxWxC (channel counts 1, 3, 4)."""
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        return t.permute(1, 2, 0)
    if t.ndim == 4 and t.shape[1] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        return t.permute(0, 2, 3, 1)
    return t


def conform(item: Any, channels: int, size: tuple[int, int], policy: str) -> np.ndarray:
    """One image (path, PIL image or array) -> HxWxC uint8 at the training layout, through the
    decoder's own path (orientation, range, resize policy), so it matches what training saw."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(Path(item), channels, size, policy=policy)
    image = item if isinstance(item, Image.Image) else array_to_pil(np.asarray(item))
    return decode_pixels(image, channels, size, policy)


def array_to_pil(array: np.ndarray) -> Image.Image:
    """uint8 as is; floats in [0, 1] scaled to 0-255; other integer ranges clipped to 0-255."""
    if array.dtype.kind == "f":
        array = np.clip(np.nan_to_num(array) * (255.0 if array.max(initial=0) <= 1.0 else 1.0), 0, 255)
    array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)
