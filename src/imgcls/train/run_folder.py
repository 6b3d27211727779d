"""The run folder: self-describing, refused when it holds a different run."""

from __future__ import annotations

import hashlib
import shutil
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


def prepare_run_folder(out: Path, config: TrainConfig, overwrite: bool = False) -> str:
    """'new', 'resume' or 'complete'; refuses a folder that holds something else unless overwrite."""
    if overwrite and out.exists():
        if out.is_dir() and not (out / CONFIG_FILE).exists() and any(out.iterdir()) \
                and not (out / RUN_FILE).exists():
            raise RunFolderError(f"{out}: not a run folder (no {CONFIG_FILE}); refusing to delete it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"  # created by the first write, after the data passed its checks
    if not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder")
    config_file = out / CONFIG_FILE
    if not config_file.exists():
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
