"""The run folder: every file of a training run, each with one typed reader and writer.

This module is the only place that knows the file names; everything else asks a RunFolder.
Writes are atomic (fileio); a reader that finds a file missing, unreadable or of the wrong
shape raises one RunFolderError line naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.data.classes import ClassMap
from imgcls.data.transforms import Preprocess
from imgcls.errors import RunFolderError
from imgcls.models import create_model
from imgcls.models.io import read_metadata, read_state_dict, save_model, sha256_file
from imgcls.train.checkpoint import load_checkpoint, save_checkpoint

# What run.json's "model" record must hold to rebuild the model and its preprocessing.
MODEL_INFO_KEYS = ("name", "in_chans", "image_size", "data_channels", "data_size", "mean", "std")
# The keys of RunFolder.describe_model(), which an export's sidecar carries too.
DESCRIPTION_KEYS = ("model", "classes", "source_run", "config_hash", "best_val_acc", "weights_sha256")
# What a resume checkpoint must hold (older checkpoints may lack "head_probe").
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "total_epochs", "best_acc", "best_epoch",
                   "elapsed_s", "history")


def config_differences(old: dict, new: dict) -> list[str]:
    """'lr: 0.004 -> 0.01' for every setting that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def data_fingerprint(ids: list[str], labels: list[str] | None, quarantined: int) -> dict:
    """Rows, classes and a digest of (id, label) pairs: a resumed run must see the same data."""
    h = hashlib.sha256()
    for image_id, label in zip(ids, labels or [""] * len(ids)):
        h.update(f"{image_id}\t{label}\n".encode())
    return {"rows": len(ids), "classes": len(set(labels or [])), "quarantined": quarantined,
            "digest": h.hexdigest()[:16]}


def _kind(obj: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(obj), "a number")


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict, with a mismatch (`size mismatch`, missing or unexpected keys) as one line."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        first = lines[0] if lines else str(exc).splitlines()[0]
        raise RunFolderError(f"{path}: weights do not fit the model the run describes "
                             f"({first.rstrip('.')}{'; ...' if len(lines) > 1 else ''})") from None


class RunFolder:
    """One training run on disk: config, classes, split, data fingerprint, weights, resume state,
    per-epoch metrics, the run record, evaluation outputs and default export places."""

    CONFIG = "config.json"
    CLASSES = "classes.json"
    SPLIT = "split.json"
    DATA = "data.json"
    QUARANTINE = "quarantine.json"
    MODEL = "model.safetensors"
    CHECKPOINT = "checkpoint.pt"
    METRICS = "metrics.jsonl"
    RUN = "run.json"
    EVAL = "eval.json"
    CONFUSION_CSV = "confusion.csv"
    CONFUSION_PNG = "confusion.png"
    TEST_PROBA = "test_proba.npz"
    ENSEMBLE = "ensemble.json"  # an ensemble's members and how their probabilities combine
    EXPORTS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "onnx-int8": "model.int8.onnx"}
    ENGINE = "engine.json"  # the engine `--engine auto` measured fastest, with its measurements
    ENGINE_SERVE = "engine.serve.json"  # the same for `imgcls serve`, timed at its batch sizes
    SIDECAR_SUFFIX = ".json"  # an export's sidecar: model.onnx -> model.onnx.json
    # What a finished run must hold for predict, export and serve (an ensemble: no weights of its own).
    FINISHED = (CONFIG, CLASSES, RUN, MODEL)
    ENSEMBLE_FINISHED = (ENSEMBLE, CLASSES, RUN)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def written_files(cls) -> tuple[str, ...]:
        """Every file imgcls writes into a run folder: --overwrite removes these and nothing else."""
        exports = tuple(cls.EXPORTS.values())
        return (cls.CONFIG, cls.CLASSES, cls.SPLIT, cls.DATA, cls.QUARANTINE, cls.MODEL, cls.CHECKPOINT,
                cls.METRICS, cls.RUN, cls.EVAL, cls.CONFUSION_CSV, cls.CONFUSION_PNG, cls.TEST_PROBA,
                cls.ENGINE, cls.ENGINE_SERVE, cls.ENSEMBLE, *exports, *(name + cls.SIDECAR_SUFFIX for name in exports))

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    # -- reading, validated ------------------------------------------------------------------

    def _read_json(self, name: str, keys: tuple[str, ...] = (), kind: type = dict) -> Any:
        """The JSON in `name`; a missing file, invalid JSON or the wrong shape is one RunFolderError."""
        path = self.path / name
        if not path.is_file():
            raise RunFolderError(f"{path}: missing; {self.path} is not a finished run folder")
        try:
            obj = fileio.read_json(path)
        except json.JSONDecodeError as exc:
            raise RunFolderError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunFolderError(f"{path}: unreadable ({exc})") from None
        if not isinstance(obj, kind):
            raise RunFolderError(f"{path}: expected {_kind(kind())}, found {_kind(obj)}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise RunFolderError(f"{path}: not the file a run writes (no {', '.join(map(repr, missing))})")
        return obj

    def is_ensemble(self) -> bool:
        return self.has(self.ENSEMBLE)

    def read_ensemble(self) -> dict:
        """ensemble.json: member run folders, their weights and how they were chosen."""
        obj = self._read_json(self.ENSEMBLE, ("members", "weights", "combine"))
        members, weights = obj["members"], obj["weights"]
        if not (isinstance(members, list) and isinstance(weights, list) and len(members) == len(weights) >= 1
                and all(isinstance(w, (int, float)) and w >= 0 for w in weights) and sum(weights) > 0):
            raise RunFolderError(f"{self.path / self.ENSEMBLE}: members and weights must be lists of the "
                                 f"same length with non-negative weights")
        return obj

    def require_finished(self) -> None:
        """Refuse a folder that lacks what predict, export and serve read."""
        for name in self.ENSEMBLE_FINISHED if self.is_ensemble() else self.FINISHED:
            if not self.has(name):
                raise RunFolderError(f"{self.path}: not a finished run folder (missing {name})")

    def read_config(self) -> TrainConfig:
        obj = self._read_json(self.CONFIG, ("data_dir",))
        try:
            return TrainConfig.from_json(obj)
        except TypeError as exc:
            raise RunFolderError(f"{self.path / self.CONFIG}: not a training configuration ({exc})") from None

    def read_classes(self) -> dict:
        """classes.json as written: the class map plus the CSV's id and label column names."""
        return self._read_json(self.CLASSES, ("labels", "names", "integer_labels"))

    def class_map(self) -> ClassMap:
        obj = self.read_classes()
        if not (isinstance(obj["labels"], list) and isinstance(obj["names"], list)
                and len(obj["labels"]) == len(obj["names"]) >= 2):
            raise RunFolderError(f"{self.path / self.CLASSES}: labels and names must be lists of the same "
                                 f"length, two classes or more")
        return ClassMap.from_json(obj)

    def read_split(self) -> dict:
        return self._read_json(self.SPLIT, ("seed", "val_ids"))

    def read_data_fingerprint(self) -> dict | None:
        return self._read_json(self.DATA, ("rows", "digest")) if self.has(self.DATA) else None

    def read_run(self) -> dict:
        return self._read_json(self.RUN)

    def is_complete(self) -> bool:
        return self.has(self.RUN) and self.read_run().get("status") == "complete"

    def model_info(self) -> dict:
        """run.json's model record: registry name, channels, sizes and normalisation."""
        info = self._read_json(self.RUN, ("model",))["model"]
        missing = [k for k in MODEL_INFO_KEYS if k not in info] if isinstance(info, dict) else MODEL_INFO_KEYS
        if missing:
            raise RunFolderError(f"{self.path / self.RUN}: its model record lacks {', '.join(missing)}")
        return info

    def model_kwargs(self, info: dict) -> dict:
        """The builder arguments of the recorded network: the model record's, or for runs written
        before the record carried them, the recipe run.json recorded (a recipe model's shape)."""
        kwargs = info["kwargs"] if "kwargs" in info else self.read_run().get("recipe", {})
        if not isinstance(kwargs, dict):
            raise RunFolderError(f"{self.path / self.RUN}: the model's shape is {_kind(kwargs)}, not a mapping")
        return kwargs

    def read_metrics(self) -> list[dict]:
        """One record per finished epoch (none before the first)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as exc:
                raise RunFolderError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
            if record is not None and not isinstance(record, dict):
                raise RunFolderError(f"{path}: line {number} is {_kind(record)}, not an epoch record")
            records += [record] if record is not None else []
        return records

    def read_eval(self) -> dict:
        return self._read_json(self.EVAL, ("accuracy", "confusion", "per_class"))

    def read_test_proba(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probabilities, test-set indices, true classes) saved by the last scoring."""
        path = self.path / self.TEST_PROBA
        try:
            saved = np.load(path, allow_pickle=False)
            return saved["proba"], saved["index"], saved["y_true"]
        except (OSError, KeyError, ValueError) as exc:
            raise RunFolderError(f"{path}: unreadable test predictions ({exc})") from None

    def load_weights(self, model: nn.Module) -> None:
        """The best weights into `model`; weights of another shape are one line, not a traceback."""
        path = self.path / self.MODEL
        load_weights_into(model, read_state_dict(path), path)

    def load_model(self) -> tuple[nn.Module, Preprocess]:
        """The best model, rebuilt from run.json's model record and classes.json, with its preprocessing."""
        self.require_finished()
        info, classes = self.model_info(), self.class_map()
        model = create_model(info["name"], num_classes=classes.num_classes, in_chans=info["in_chans"],
                             **self.model_kwargs(info))
        self.load_weights(model)
        preprocess = Preprocess(tuple(info["mean"]), tuple(info["std"]), info["in_chans"],
                                tuple(info["image_size"]) if info["image_size"] else None)
        return model, preprocess

    def describe_model(self) -> dict:
        """What a consumer of the model needs besides the weights: the model record (input layout,
        normalisation), the classes and where it came from. An export's sidecar and the server's
        /model are both made from it (DESCRIPTION_KEYS)."""
        run = self.read_run()
        return {"model": self.model_info(), "classes": self.read_classes(), "source_run": str(self.path),
                "config_hash": run.get("config_hash"), "best_val_acc": run.get("best_val_acc"),
                "weights_sha256": self.weights_sha256()}

    def weights_sha256(self) -> str:
        """The digest of the weights; for an ensemble, of its members' weights and their combination."""
        if not self.is_ensemble():
            return sha256_file(self.path / self.MODEL)
        ensemble = self.read_ensemble()
        parts = [f"{RunFolder(m).weights_sha256()}:{w!r}" for m, w in zip(ensemble["members"], ensemble["weights"])]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def model_epoch(self) -> str | None:
        """The (0-based) epoch model.safetensors comes from, as its metadata says."""
        return read_metadata(self.path / self.MODEL).get("epoch") if self.has(self.MODEL) else None

    def read_checkpoint(self) -> dict | None:
        """The resume state, or None before the first epoch finished."""
        if not self.has(self.CHECKPOINT):
            return None
        path = self.path / self.CHECKPOINT
        saved = load_checkpoint(path)
        missing = [k for k in CHECKPOINT_KEYS if k not in saved] if isinstance(saved, dict) else CHECKPOINT_KEYS
        if missing:
            raise RunFolderError(f"{path}: not a resume checkpoint (no {', '.join(missing)})")
        return saved

    def load_checkpoint_model(self, model: nn.Module, saved: dict) -> None:
        load_weights_into(model, saved["model"], self.path / self.CHECKPOINT)

    # -- writing, atomic ---------------------------------------------------------------------

    def write_config(self, config: TrainConfig) -> None:
        fileio.write_json(self.path / self.CONFIG, config.to_json())

    def write_classes(self, classes: ClassMap, id_column: str | None, label_column: str | None) -> None:
        fileio.write_json(self.path / self.CLASSES, {**classes.to_json(), "id_column": id_column,
                                                      "label_column": label_column})

    def write_split(self, split: dict) -> None:
        fileio.write_json(self.path / self.SPLIT, split)

    def write_quarantine(self, bad: list) -> None:
        fileio.write_json(self.path / self.QUARANTINE, bad)

    @property
    def quarantine_path(self) -> Path:
        return self.path / self.QUARANTINE

    def write_data_fingerprint(self, fingerprint: dict) -> None:
        fileio.write_json(self.path / self.DATA, fingerprint)

    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(self.path / self.CHECKPOINT, state)

    def save_model(self, model: nn.Module, epoch: int) -> None:
        save_model(model, self.path / self.MODEL, {"epoch": str(epoch)})

    def write_metrics(self, history: list[dict]) -> None:
        fileio.write_text(self.path / self.METRICS, "".join(fileio.to_json(h) + "\n" for h in history))

    def append_metrics(self, record: dict) -> None:
        fileio.append_jsonl(self.path / self.METRICS, record)

    def write_run(self, run: dict) -> None:
        fileio.write_json(self.path / self.RUN, run)

    def write_ensemble(self, ensemble: dict) -> None:
        fileio.write_json(self.path / self.ENSEMBLE, ensemble)

    def write_eval(self, metrics: dict) -> None:
        fileio.write_json(self.path / self.EVAL, metrics)

    def write_confusion_csv(self, confusion: np.ndarray, names: list[str]) -> None:
        header = "true\\predicted," + ",".join(f'"{n}"' for n in names)
        rows = [f'"{n}",' + ",".join(str(v) for v in row) for n, row in zip(names, confusion)]
        fileio.write_text(self.path / self.CONFUSION_CSV, "\n".join([header, *rows]) + "\n")

    @property
    def confusion_png(self) -> Path:
        return self.path / self.CONFUSION_PNG

    def write_test_proba(self, proba: np.ndarray, index: np.ndarray, y_true: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, proba=proba.astype(np.float32), index=index, y_true=y_true)
        with fileio.atomic_path(self.path / self.TEST_PROBA) as tmp:
            tmp.write_bytes(buffer.getvalue())

    def export_path(self, fmt: str) -> Path:
        """Where `imgcls export` puts a format when no --out is given."""
        return self.path / self.EXPORTS[fmt]

    # -- the folder as a whole ---------------------------------------------------------------

    def is_run_folder(self) -> bool:
        """Provably written by `imgcls train`: a config.json that reads as a TrainConfig, and the
        classes.json and split.json that training writes before it (an ensemble: its ensemble.json,
        classes.json and run.json)."""
        try:
            if self.is_ensemble():
                self.read_ensemble()
                self.read_run()
            else:
                self.read_config()
                self.read_split()
            self.read_classes()
        except RunFolderError:
            return False
        return True

    def clear(self) -> None:
        """--overwrite: remove the files an earlier run wrote; refuse anything that is not provably a run."""
        out = self.path
        if not out.exists() and not out.is_symlink():
            return
        if not out.is_dir():
            raise RunFolderError(f"{out}: exists and is not a folder; --overwrite replaces only run folders")
        if not any(out.iterdir()):
            return
        if not self.is_run_folder():
            raise RunFolderError(f"{out}: not a run folder written by imgcls (no readable {self.CONFIG}, "
                                 f"{self.CLASSES} and {self.SPLIT}); refusing to replace it")
        for name in self.written_files():
            (out / name).unlink(missing_ok=True)
        self.remove_stale_temp_files()

    def prepare(self, config: TrainConfig, overwrite: bool = False) -> str:
        """'new', 'resume' or 'complete'; refuses a folder that holds something else unless overwrite."""
        out = self.path
        if overwrite:
            self.clear()
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return "new"  # created by the first write, after the data passed its checks
        if not out.is_dir():
            raise RunFolderError(f"{out}: exists and is not a folder")
        if not self.has(self.CONFIG):
            if overwrite:
                return "new"  # only the user's own files are left: the run trains next to them
            raise RunFolderError(f"{out}: folder is not empty and holds no run; choose another --out")
        diffs = config_differences(self.read_config().identity(), config.identity())
        if diffs:
            raise RunFolderError(f"{out}: holds a different run ({'; '.join(diffs)}); "
                                 f"use another --out, or --overwrite to replace it")
        if self.is_complete():
            return "complete"
        self.remove_stale_temp_files()
        return "resume"

    def confirm_same_data(self, fingerprint: dict) -> None:
        """Refuse to resume on data that changed since the run started (the split would silently differ)."""
        old = self.read_data_fingerprint()
        if old is None:
            return
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if diffs:
            raise RunFolderError(f"{self.path}: holds a run on different data ({'; '.join(diffs)}; the CSV, "
                                 f"labels or images changed); use another --out, or --overwrite to replace it")

    def remove_stale_temp_files(self) -> None:
        """Temp files a killed process left mid-write (fileio.atomic_path names them .<name>.*.tmp)."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
