"""Atomic writes: a kill at any moment leaves the old file or the new one, never a torn one.

JSON is always standard JSON: a non-finite float (an accuracy with no image to measure it on)
is written as null, never as the bare NaN or Infinity that other tools refuse.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from imgcls.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable: without it a power cut can undo it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms that cannot open folders
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is a file where a folder is needed, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    """One line naming the path the user asked for, not the temp file, with the system's reason."""
    blocker = _file_in_the_way(path)
    reason = f"{blocker} is a file, not a folder" if blocker else (exc.strerror or str(exc))
    return OutputError(f"{path}: cannot write ({reason})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds.

    An OSError on the way (read-only folder, full disk, a file where a folder should be) becomes
    an OutputError naming `path`; the file that was there before is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name to write to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run folder should read like any file
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (null in JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    """Standard JSON text: non-finite floats become null (allow_nan=False catches any other way in)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed so run folders stay readable."""
    write_text(path, to_json(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; rewritten atomically so a kill never leaves half a line."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    write_text(path, old + to_json(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
