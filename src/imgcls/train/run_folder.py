"""The run folder: self-describing, refused when it holds a different run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.errors import RunFolderError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


DATA_FILE = "data.json"


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


def confirm_same_data(out: Path, fingerprint: dict) -> None:
    """Refuse to resume on data that changed since the run started (the split would silently differ)."""
    path = out / DATA_FILE
    if not path.exists():
        return
    old = fileio.read_json(path)
    diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
    if diffs:
        raise RunFolderError(f"{out}: holds a run on different data ({'; '.join(diffs)}; the CSV, labels "
                             f"or images changed); use another --out, or --overwrite to replace it")


# Every file imgcls writes into a run folder (train, evaluate, compare, export's default place):
# --overwrite removes these and nothing else, so a file the user put in the folder survives.
WRITTEN_FILES = (CONFIG_FILE, "classes.json", "split.json", DATA_FILE, "quarantine.json", "model.safetensors",
                 "checkpoint.pt", "metrics.jsonl", RUN_FILE, "eval.json", "confusion.csv", "confusion.png",
                 "test_proba.npz", "model.onnx", "model.onnx.json", "model.torchscript.pt",
                 "model.torchscript.pt.json")


def _json_object(path: Path, keys: tuple[str, ...]) -> dict | None:
    """The JSON object in `path` when it has every one of `keys`, else None."""
    try:
        obj = fileio.read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and all(k in obj for k in keys) else None


def is_run_folder(out: Path) -> bool:
    """Provably written by `imgcls train`: a config.json that reads as a TrainConfig, and the
    classes.json and split.json that training writes before it."""
    config = _json_object(out / CONFIG_FILE, ("data_dir", "model", "strategy", "seed"))
    if config is None or _json_object(out / "classes.json", ("labels", "names")) is None \
            or _json_object(out / "split.json", ("seed", "val_ids")) is None:
        return False
    try:
        TrainConfig.from_json(config)
    except TypeError:
        return False
    return True


def clear_run_folder(out: Path) -> None:
    """--overwrite: remove the files an earlier run wrote; refuse anything that is not provably a run."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder; --overwrite replaces only run folders")
    if not any(out.iterdir()):
        return
    if not is_run_folder(out):
        raise RunFolderError(f"{out}: not a run folder written by imgcls (no readable {CONFIG_FILE}, "
                             f"classes.json and split.json); refusing to replace it")
    for name in WRITTEN_FILES:
        (out / name).unlink(missing_ok=True)
    remove_stale_temp_files(out)


def prepare_run_folder(out: Path, config: TrainConfig, overwrite: bool = False) -> str:
    """'new', 'resume' or 'complete'; refuses a folder that holds something else unless overwrite."""
    if overwrite:
        clear_run_folder(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"  # created by the first write, after the data passed its checks
    if not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder")
    config_file = out / CONFIG_FILE
    if not config_file.exists():
        if overwrite:
            return "new"  # only the user's own files are left: the run trains next to them
        raise RunFolderError(f"{out}: folder is not empty and holds no run; choose another --out")
    old = TrainConfig.from_json(fileio.read_json(config_file))
    diffs = config_differences(old.identity(), config.identity())
    if diffs:
        raise RunFolderError(f"{out}: holds a different run ({'; '.join(diffs)}); "
                             f"use another --out, or --overwrite to replace it")
    run = fileio.read_json(out / RUN_FILE) if (out / RUN_FILE).exists() else {}
    if run.get("status") == "complete":
        return "complete"
    remove_stale_temp_files(out)
    return "resume"


def remove_stale_temp_files(out: Path) -> None:
    """Temp files a killed process left mid-write (fileio.atomic_path names them .<name>.*.tmp)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
