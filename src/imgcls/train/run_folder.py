"""The run folder: self-describing, refused when it holds a different run."""

from __future__ import annotations

import shutil
from pathlib import Path

from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.errors import RunFolderError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


def config_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare_run_folder(out: Path, config: TrainConfig, overwrite: bool = False) -> str:
    """'new', 'resume' or 'complete'; refuses a folder that holds something else unless overwrite."""
    if overwrite and out.exists():
        if out.is_dir() and not (out / CONFIG_FILE).exists() and any(out.iterdir()) \
                and not (out / RUN_FILE).exists():
            raise RunFolderError(f"{out}: not a run folder (no {CONFIG_FILE}); refusing to delete it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        out.mkdir(parents=True, exist_ok=True)
        return "new"
    if not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder")
    config_file = out / CONFIG_FILE
    if not config_file.exists():
        raise RunFolderError(f"{out}: folder is not empty and holds no run; choose another --out")
    old = TrainConfig.from_json(fileio.read_json(config_file))
    diffs = config_differences(old.identity(), config.identity())
    if diffs:
        raise RunFolderError(f"{out}: holds a different run ({'; '.join(diffs)}); "
                             f"use another --out or --overwrite")
    run = fileio.read_json(out / RUN_FILE) if (out / RUN_FILE).exists() else {}
    return "complete" if run.get("status") == "complete" else "resume"
