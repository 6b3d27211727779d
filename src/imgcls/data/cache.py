"""Decode a dataset's images once into a memory-mapped uint8 file, so epochs never decode an image.

Layout beside the data (`.imgcls_cache/`): `<csv>-<content key>.layout.json` (channels and sizes
from the image headers), and per storage shape `<csv>-<key>-<H>x<W>x<C>-<policy>.u8` (raw N x H x W
x C pixels) with its `.json` marker (shape, kept rows, bad rows, byte count, a checksum of sampled
rows). The marker is written last and atomically: a file without a valid one is never read. A build
killed half-way resumes from its `.partial` file and `.progress` record; a damaged cache is rebuilt
with a one-line notice.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from imgcls import fileio
from imgcls.data.images import DEFAULT_RESIZE, check_resize, image_channels, load_image, turned_sideways
from imgcls.data.source import MemmapSource
from imgcls.data.table import ImageTable
from imgcls.errors import DataError, OptionError, where
from imgcls.runtime import usable_cores

CACHE_VERSION = 2
# Without a known model input size, images larger than this are still stored at this side.
UNBOUNDED_MAX_SIDE = 512
# Images smaller than this (source pixels) decode in one process: for Fashion-MNIST's 28x28 PNGs,
# mostly Python overhead, a pool measured no faster (benchmarks/photos_fashion_mnist_cache.py).
POOL_MIN_IMAGE_PIXELS = 128 * 128
CHUNK = 64  # images per pool task: enough to hide the round trip, small enough for an even finish
PROGRESS_EVERY_S = 5.0  # how often a build records how far it got (what a resumed build skips)
SAMPLE_ROWS = 16  # rows hashed into the marker's checksum


@dataclass
class DecodedImages:
    """N x H x W x C uint8 images for the table's rows that decoded, plus what was skipped."""

    source: MemmapSource
    keep: list[int]  # positions in the table that decoded
    bad: list[dict] = field(default_factory=list)  # {"id", "file", "row", "reason"}
    from_cache: bool = False
    policy: str = DEFAULT_RESIZE

    @property
    def array(self) -> np.ndarray:
        return self.source.array


@dataclass(frozen=True)
class Layout:
    """What the image headers say: grey or colour, the most common (upright) size, one size or many."""

    channels: int
    common: tuple[int, int]
    single: bool


def storage_side(input_side: int | None) -> int | None:
    """The stored shorter side for a model input side: ImageNet's resize-256-crop-224 ratio, the
    headroom random-resized-crop and the final resize work from."""
    return None if input_side is None else math.ceil(input_side * 8 / 7)


def storage_shape(layout: Layout, size: tuple[int, int] | None, bound: int | None) -> tuple[int, int]:
    """An explicit size; else one native size that fits the bound (Fashion-MNIST stays 28x28);
    else a square of the bound (or of the common shorter side when smaller)."""
    if size is not None:
        return tuple(size)
    limit = bound or UNBOUNDED_MAX_SIDE
    if layout.single and min(layout.common) <= limit:
        return layout.common
    side = min(limit, min(layout.common))
    return side, side


def cache_root(table: ImageTable) -> Path:
    """Beside the data (`.imgcls_cache/`), or IMGCLS_CACHE_DIR when set (read-only datasets)."""
    env = os.environ.get("IMGCLS_CACHE_DIR")
    if env:
        return Path(env)
    base = table.source.parent if table.source.is_file() else table.source
    return base / ".imgcls_cache"


def fingerprint(table: ImageTable) -> str:
    """Changes whenever the CSV or any image file (size or mtime) changes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    if table.source.is_file():
        h.update(table.source.read_bytes())
    for image_id, label, path in zip(table.ids, table.labels or [""] * len(table), table.paths):
        try:
            st = path.stat()
            h.update(f"{image_id}|{label}|{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{image_id}|{path}|missing\n".encode())
    return h.hexdigest()[:24]


def describe_row(table: ImageTable, i: int) -> str:
    """'images/x.png (train.csv row 12)': where a bad image comes from."""
    row = table.row_of(i)
    origin = f" ({where(table.source.name, row)})" if row is not None else ""
    return f"{table.paths[i]}{origin}"


def probe_layout(table: ImageTable) -> Layout:
    """Channels (1 if every image is grey) and sizes as displayed (EXIF-rotated), from headers only."""
    grey, sizes = True, collections.Counter()
    for path in table.paths:
        header = read_header(path)
        if header is not None:
            grey &= header[0] == 1
            sizes[header[1]] += 1
    if not sizes:
        return Layout(1, (1, 1), True)
    return Layout(1 if grey else 3, sizes.most_common(1)[0][0], len(sizes) == 1)


def read_header(path: Path) -> tuple[int, tuple[int, int]] | None:
    try:
        from PIL import Image
        with Image.open(path) as image:
            turned = turned_sideways(image)
            size = (image.width, image.height) if turned else (image.height, image.width)
            return image_channels(image), size
    except Exception:  # noqa: BLE001 - reported properly by the full decode pass
        return None


def notice(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def decode_images(table: ImageTable, *, channels: int | None = None, size: tuple[int, int] | None = None,
                  bound: int | None = None, policy: str = DEFAULT_RESIZE, on_bad: str = "fail",
                  use_cache: bool = True) -> DecodedImages:
    """All images as one memory-mapped uint8 array, from the cache when its fingerprint still matches.
    `size` fixes the storage shape (prediction: the training run's); else `bound` caps its side."""
    if on_bad not in ("fail", "skip"):
        raise OptionError(f"on_bad must be 'fail' or 'skip', not {on_bad!r}")
    check_resize(policy)
    if not len(table):
        shape = (0, 1, 1, channels or 1)
        return DecodedImages(MemmapSource(os.devnull, shape), [], [], False, policy)
    key = fingerprint(table)
    root = cache_root(table)
    layout = _layout(table, root / f"{table.source.stem}-{key}.layout.json", use_cache)
    height, width = storage_shape(layout, size, bound)
    shape = (len(table), height, width, channels or layout.channels)
    native = layout.single and layout.common == (height, width)
    base = root / f"{table.source.stem}-{key}-{height}x{width}x{shape[3]}-{'native' if native else policy}"
    if not use_cache or not _writable(root):
        decoded = _build_unlinked(table, shape, policy, layout.common)
    else:
        decoded = _open_or_build(table, base, shape, policy, key, layout.common)
    if decoded.bad and on_bad == "fail":
        raise DataError(format_bad(decoded.bad))
    return decoded


def _layout(table: ImageTable, path: Path, use_cache: bool) -> Layout:
    if use_cache:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            obj = json.loads(path.read_text())
            return Layout(int(obj["channels"]), tuple(obj["common"]), bool(obj["single"]))
    layout = probe_layout(table)
    if use_cache:
        with contextlib.suppress(OSError):
            fileio.write_json(path, {"channels": layout.channels, "common": list(layout.common),
                                     "single": layout.single})
    return layout


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.access(root, os.W_OK)
    except OSError:
        return False  # a read-only dataset folder costs a decode per load, into a temporary file


def _open_or_build(table: ImageTable, base: Path, shape: tuple, policy: str, key: str,
                   source_size: tuple[int, int]) -> DecodedImages:
    marker = base.with_suffix(".json")
    if marker.exists():
        try:
            return _open(base, shape, policy)
        except CacheDamaged as exc:
            notice(f"{base.with_suffix('.u8')}: {exc}; rebuilding the cache")
    with _locked(base.with_suffix(".lock")):
        if marker.exists():  # another process (torchrun rank) may have built it meanwhile
            with contextlib.suppress(CacheDamaged):
                return _open(base, shape, policy)
            marker.unlink(missing_ok=True)
        _remove_stale(base.parent, table.source.stem, key)
        _build(table, base, shape, policy, source_size)
        built = _open(base, shape, policy)
        built.from_cache = False
        return built


class CacheDamaged(Exception):
    """The cache files do not match their marker: truncated, overwritten or from another version."""


def _open(base: Path, shape: tuple, policy: str) -> DecodedImages:
    data_file = base.with_suffix(".u8")
    try:
        meta = json.loads(base.with_suffix(".json").read_text())
        rows, keep, bad = int(meta["rows"]), list(meta["keep"]), list(meta["bad"])
        stored = (rows, *shape[1:])
        valid = meta["version"] == CACHE_VERSION and list(meta["shape"]) == list(shape[1:]) \
            and len(keep) == rows
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheDamaged(f"unreadable marker ({type(exc).__name__})") from None
    if not valid:
        raise CacheDamaged("marker does not describe this cache")
    try:
        actual = data_file.stat().st_size
    except OSError:
        raise CacheDamaged("pixel file missing") from None
    if actual != rows * int(np.prod(shape[1:])):
        raise CacheDamaged(f"pixel file is {actual:,} bytes, the marker says {rows * int(np.prod(shape[1:])):,}")
    source = MemmapSource(data_file, stored)
    if sample_checksum(source.array) != meta["checksum"]:
        raise CacheDamaged("pixels do not match the marker's checksum")
    return DecodedImages(source, keep, bad, True, policy)


def sample_checksum(array: np.ndarray) -> str:
    """sha256 of up to SAMPLE_ROWS evenly spaced rows: catches overwritten files without reading all."""
    h = hashlib.sha256(str(array.shape).encode())
    for i in sorted({int(i) for i in np.linspace(0, len(array) - 1, SAMPLE_ROWS)} if len(array) else []):
        h.update(array[i].tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache file (torchrun ranks start together); others wait, then read."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale(root: Path, stem: str, key: str) -> None:
    """Caches of this CSV from older contents (and the old single-file .npz format) go, except one
    another process is building right now (its lock is held): the data changed under that run, and
    deleting its half-written file would crash it."""
    for path in root.glob(f"{stem}-*"):
        if not path.name.startswith(f"{stem}-{key}") and path.suffix in (".npz", ".u8", ".json", ".partial",
                                                                         ".progress", ".lock") \
                and not _being_built(path.with_suffix(".lock")):
            path.unlink(missing_ok=True)


def _being_built(lock: Path) -> bool:
    """Whether a process holds the build lock of this cache file (see _locked)."""
    try:
        with open(lock, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False  # no lock file: an old format, or a build that never started
    return False


def _build(table: ImageTable, base: Path, shape: tuple, policy: str, source_size: tuple[int, int]) -> None:
    """Decode into `.partial` (resuming a killed build), compact away bad rows, then publish:
    rename to `.u8`, and only then write the marker."""
    partial, progress = base.with_suffix(".partial"), base.with_suffix(".progress")
    done, bad = _resume_point(partial, progress, shape)
    array = np.memmap(partial, dtype=np.uint8, mode="r+" if done else "w+", shape=shape)

    def record(upto: int, bad_so_far: list[dict]) -> None:
        array.flush()
        fileio.write_json(progress, {"shape": list(shape), "done": upto, "bad": bad_so_far})

    bad = decode_into(table, array, shape, policy, start=done, bad=bad, record=record, source_size=source_size)
    keep, bad = compact(array, len(table), bad)
    array.flush()
    del array
    os.truncate(partial, len(keep) * int(np.prod(shape[1:])))
    final = MemmapSource(partial, (len(keep), *shape[1:]))
    checksum = sample_checksum(final.array)
    del final
    os.replace(partial, base.with_suffix(".u8"))
    fileio.write_json(base.with_suffix(".json"), {
        "version": CACHE_VERSION, "rows": len(keep), "shape": list(shape[1:]), "policy": policy,
        "keep": keep, "bad": bad, "checksum": checksum})
    progress.unlink(missing_ok=True)


def _resume_point(partial: Path, progress: Path, shape: tuple) -> tuple[int, list[dict]]:
    """How many leading rows a killed build finished (0 when nothing usable is left)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads(progress.read_text())
        if list(record["shape"]) == list(shape) and partial.stat().st_size == int(np.prod(shape)):
            return int(record["done"]), list(record["bad"])
    return 0, []


def _build_unlinked(table: ImageTable, shape: tuple, policy: str, source_size: tuple[int, int]) -> DecodedImages:
    """No cache wanted (or possible): decode into a temporary file that is unlinked at once, so the
    pixels still live in the page cache, not in anonymous memory."""
    fd, name = tempfile.mkstemp(prefix="imgcls-decode-", suffix=".u8")
    os.close(fd)
    try:
        array = np.memmap(name, dtype=np.uint8, mode="w+", shape=shape) if shape[0] else None
        bad = decode_into(table, array, shape, policy, source_size=source_size) if array is not None else []
        keep, bad = compact(array, len(table), bad) if array is not None else ([], [])
        if array is not None:
            array.flush()
            del array
        os.truncate(name, len(keep) * int(np.prod(shape[1:])))
        source = MemmapSource(name, (len(keep), *shape[1:]))
    finally:
        os.unlink(name)
    return DecodedImages(source, keep, bad, False, policy)


def compact(array: np.ndarray, n: int, bad: list[dict]) -> tuple[list[int], list[dict]]:
    """Move the good rows down over the bad ones (in place, row by row): the table positions kept,
    and the bad rows as reported (without their position)."""
    bad_positions = {b["position"] for b in bad}
    keep = [i for i in range(n) if i not in bad_positions]
    for j, i in enumerate(keep):
        if i != j:
            array[j] = array[i]
    return keep, [{k: v for k, v in b.items() if k != "position"} for b in bad]


def decode_into(table: ImageTable, array: np.ndarray, shape: tuple, policy: str, *, start: int = 0,
                bad: list[dict] | None = None, record: Callable[[int, list[dict]], None] | None = None,
                source_size: tuple[int, int] = (0, 0)) -> list[dict]:
    """Decode rows start.. into array[i] (table position i); the bad ones, as dicts with 'position'."""
    from tqdm.auto import tqdm

    bad = list(bad or [])
    jobs = [(i, min(i + CHUNK, len(table))) for i in range(start, len(table), CHUNK)]
    workers = decode_workers(len(table) - start, source_size)
    bar = tqdm(total=len(table), initial=start, desc="decoding images", unit="img", leave=False,
               disable=None, smoothing=0.1)
    last = time.monotonic()
    with _chunk_results(table, array, shape, policy, jobs, workers) as results:
        for stop, failures in results:
            bad.extend(_bad_entry(table, i, reason) for i, reason in failures)
            bar.update(stop - bar.n)
            if record is not None and time.monotonic() - last > PROGRESS_EVERY_S:
                record(stop, bad)
                last = time.monotonic()
    bar.close()
    return bad


def decode_workers(n: int, source_size: tuple[int, int]) -> int:
    """All cores this process may use, for images large enough to repay a pool (photos)."""
    cores = usable_cores()
    small = source_size[0] * source_size[1] < POOL_MIN_IMAGE_PIXELS
    return 1 if small or n <= CHUNK else min(cores, -(-n // CHUNK))


@contextlib.contextmanager
def _chunk_results(table, array, shape, policy, jobs, workers) -> Iterator[Iterator[tuple[int, list]]]:
    """(stop, [(position, reason)]) per chunk in order, from this process or a pool writing the file."""
    paths = [str(p) for p in table.paths]
    labels = [describe_row(table, i) for i in range(len(table))]
    tasks = [(a, b, paths[a:b], labels[a:b]) for a, b in jobs]
    if workers <= 1:
        _Worker.array, _Worker.shape, _Worker.policy = array, shape, policy
        try:
            yield (_decode_chunk(task) for task in tasks)
        finally:
            _Worker.array = None  # the caller truncates the file next: drop this mapping of it
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker,
                                                  (str(array.filename), shape, policy)) as pool:
        yield pool.imap(_decode_chunk, tasks)


class _Worker:
    array: np.ndarray | None = None
    shape: tuple = ()
    policy: str = DEFAULT_RESIZE


def _init_worker(filename: str, shape: tuple, policy: str) -> None:
    # A forked worker inherits the parent's SIGTERM handler (Ctrl-C-like, raising), and the pool ends
    # its workers with SIGTERM: each printed a traceback. Ctrl-C reaches the whole process group; the
    # parent alone handles it and ends the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _Worker.array = np.memmap(filename, dtype=np.uint8, mode="r+", shape=shape)
    _Worker.shape, _Worker.policy = shape, policy


def _decode_chunk(task: tuple) -> tuple[int, list[tuple[int, str]]]:
    start, stop, paths, labels = task
    failures = []
    size, channels = _Worker.shape[1:3], _Worker.shape[3]
    for i, path, label in zip(range(start, stop), paths, labels):
        try:
            _Worker.array[i] = load_image(Path(path), channels, size, label, _Worker.policy)
        except DataError as exc:
            failures.append((i, str(exc).split(": ", 1)[-1]))
    return stop, failures


def _bad_entry(table: ImageTable, i: int, reason: str) -> dict:
    return {"kind": "bad_image", "id": table.ids[i], "file": str(table.paths[i]), "row": table.row_of(i),
            "csv": table.source.name if table.rows else None, "reason": reason, "position": i}


def describe_bad(bad: dict) -> str:
    """One line per bad row: 'images/x.png (train.csv row 3): truncated ...' or 'train.csv row 3: ...'."""
    if bad.get("csv") and bad.get("row"):
        return f"{bad['file']} ({bad['csv']} row {bad['row']}): {bad['reason']}"
    return f"{bad['file']}" + (f" row {bad['row']}" if bad.get("row") else "") + f": {bad['reason']}"


def format_bad(bad: list[dict], limit: int = 20) -> str:
    """The error text listing bad rows: one line when there is one, else a capped list."""
    lines = [describe_bad(b) for b in sorted(bad, key=lambda b: (b.get("row") or 0, b["file"]))]
    if len(lines) == 1:
        return lines[0]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return (f"{len(lines)} bad rows or images:\n  " + "\n  ".join(lines[:limit]) + more
            + "\n(fix them, or use --on-bad-image skip to train without them)")
