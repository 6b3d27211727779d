"""Ensembles: a run folder that lists member run folders and how their probabilities combine.

    imgcls ensemble runs/a runs/b --out runs/ens [--combine fit]

The ensemble's probability is the weighted mean of its members' probabilities. Its folder holds
ensemble.json (members, weights, the evidence behind them), classes.json and run.json, so predict,
evaluate, serve and export take it like any run: each member decodes nothing of its own, since all
members must share the class map and the stored-image layout (channels, size, resize policy).

`--combine fit` chooses the weights that maximise the likelihood of the validation images that no
member trained on (the images every member held out); `mean` weighs members equally.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls.errors import OptionError, RunFolderError
from imgcls.predict import LOG_FLOOR, load_predictor, mix
from imgcls.train.run_folder import RunFolder

COMBINES = ("mean", "fit")
# Exponentiated-gradient steps for the weights: the likelihood is concave in them and a handful
# of members converge in far fewer steps.
FIT_STEPS = 500


def _layout(folder: RunFolder) -> tuple:
    info = folder.model_info()
    return info["data_channels"], tuple(info["data_size"]), info.get("resize", "squash")


def check_members(folders: list[RunFolder]) -> None:
    """Members must predict the same classes from the same decoded pixels; one line says which differs."""
    if len(folders) < 2:
        raise OptionError("an ensemble needs two run folders or more")
    first = folders[0]
    for folder in folders:
        folder.require_finished()
    for folder in folders[1:]:
        if folder.read_classes()["labels"] != first.read_classes()["labels"]:
            raise RunFolderError(f"{folder.path}: its classes differ from {first.path}'s; "
                                 f"members of an ensemble must predict the same classes")
        if _layout(folder) != _layout(first):
            raise RunFolderError(f"{folder.path}: decodes images as {_layout(folder)} (channels, size, "
                                 f"resize) but {first.path} as {_layout(first)}; members must share it")


def fit_weights(member_proba: list[np.ndarray], targets: np.ndarray, steps: int = FIT_STEPS) -> np.ndarray:
    """Weights on the simplex maximising mean log(sum_k w_k p_k[y]) (exponentiated gradient)."""
    p_true = np.stack([p[np.arange(len(targets)), targets] for p in member_proba], 1).astype(np.float64)
    weights = np.full(p_true.shape[1], 1.0 / p_true.shape[1])
    for _ in range(steps):
        mixed = np.maximum(p_true @ weights, LOG_FLOOR)
        weights = weights * np.exp((p_true / mixed[:, None]).mean(0) - 1.0)
        weights /= weights.sum()
    return weights


def held_out_images(folders: list[RunFolder]) -> tuple[str, list[str]] | None:
    """(dataset folder, ids) of the validation images every member held out, or None when the
    members trained on different datasets or share no validation image."""
    data_dirs = {str(Path(f.read_config().data_dir).resolve()) for f in folders}
    if len(data_dirs) != 1:
        return None
    first = folders[0].read_split()["val_ids"]
    shared = set(first).intersection(*(f.read_split()["val_ids"] for f in folders[1:]))
    ordered = [i for i in first if i in shared]
    return (data_dirs.pop(), ordered) if ordered else None


def _member_records(folders: list[RunFolder], weights: np.ndarray, val_acc: list | None) -> list[dict]:
    records = []
    for k, folder in enumerate(folders):
        run = folder.read_run()
        records.append({"run": str(folder.path.resolve()), "model": folder.model_info()["name"],
                        "best_val_acc": run.get("best_val_acc"), "weight": round(float(weights[k]), 6),
                        "held_out_acc": val_acc[k] if val_acc else None})
    return records


def _prepare_out(out: RunFolder, overwrite: bool) -> None:
    """An empty or new folder; --overwrite replaces only a run folder imgcls wrote (RunFolder.clear)."""
    if overwrite:
        out.clear()
    if out.path.exists() and (not out.path.is_dir() or any(out.path.iterdir())):
        raise RunFolderError(f"{out.path}: exists and is not empty; choose another --out"
                             + ("" if overwrite else ", or --overwrite to replace an earlier run"))


def build_ensemble(members: list[str | os.PathLike], out: str | os.PathLike, *, combine: str = "mean",
                   overwrite: bool = False, device: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Write the ensemble folder `out` and return its run.json."""
    if combine not in COMBINES:
        raise OptionError(f"unknown combination {combine!r}; valid: {', '.join(COMBINES)}")
    folders = [RunFolder(m) for m in members]
    check_members(folders)
    folder = RunFolder(out)
    _prepare_out(folder, overwrite)
    held_out = held_out_images(folders) if not any(f.is_ensemble() for f in folders) else None
    if combine == "fit" and held_out is None:
        raise OptionError("--combine fit needs members trained on one dataset with validation images in "
                          "common (same --seed and --val-fraction); use --combine mean")
    weights, evidence, member_acc = np.full(len(folders), 1.0 / len(folders)), None, None
    if held_out is not None:
        data_dir, ids = held_out
        predictors = [load_predictor(f.path, device=device) for f in folders]
        data = predictors[0].load(data_dir, classes=predictors[0].classes)
        position = {image_id: i for i, image_id in enumerate(data.ids)}
        index = torch.tensor([position[i] for i in ids if i in position])
        images, targets = data.source.gather(index), data.targets[index].numpy()
        proba = [p.predict_proba(images) for p in predictors]
        member_acc = [round(float((p.argmax(1) == targets).mean()), 5) for p in proba]
        if combine == "fit":
            weights = fit_weights(proba, targets)
        accuracy = float((mix(proba, weights).argmax(1) == targets).mean())
        evidence = {"data_dir": data_dir, "images": len(index), "accuracy": round(accuracy, 5),
                    "mean_accuracy": round(float((mix(proba, np.ones(len(proba))).argmax(1) == targets).mean()), 5)}
        log(f"held-out images every member left out of training: {len(index)}; members "
            f"{', '.join(f'{a:.4f}' for a in member_acc)}, ensemble ({combine}) {accuracy:.4f}")
    ensemble = {"members": [str(f.path.resolve()) for f in folders], "weights": [float(w) for w in weights],
                "combine": combine, "held_out": evidence}
    classes_file, member_runs = folders[0].read_classes(), [f.read_run() for f in folders]
    folder.write_classes(folders[0].class_map(), classes_file.get("id_column"), classes_file.get("label_column"))
    folder.write_ensemble(ensemble)
    digest = hashlib.sha256(repr([(r.get("config_hash"), w) for r, w in
                                  zip(member_runs, ensemble["weights"])]).encode()).hexdigest()[:16]
    run = {"status": "complete", "kind": "ensemble", "config_hash": digest,
           "model": {**folders[0].model_info(), "name": "ensemble"},
           "classes": len(classes_file["labels"]),
           "members": _member_records(folders, weights, member_acc),
           "best_val_acc": evidence["accuracy"] if evidence else None,
           "parameters": sum(int(r.get("parameters") or 0) for r in member_runs)}
    folder.write_run(run)
    return run
