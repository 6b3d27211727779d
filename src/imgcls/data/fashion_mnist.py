"""Fashion-MNIST from its original IDX files into the contest layout (train/, test/, answer key)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls import fileio
from imgcls.errors import DataError, ImgclsError

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the *decompressed* IDX files: the Debian package recompresses the .gz files,
# so only the content is comparable between the two sources.
FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: IDX body has {len(body)} bytes, header says {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def content_sha256(path: Path) -> str:
    with gzip.open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def download_cache_dir() -> Path:
    return Path(os.environ.get("IMGCLS_HOME", Path.home() / ".cache" / "imgcls")) / "fashion-mnist"


def locate_source(source_dir: Path | None = None) -> Path:
    """A folder holding the four verified IDX files: given, Debian's, cached, or downloaded."""
    candidates = [source_dir] if source_dir else [DEBIAN_DIR, download_cache_dir()]
    for folder in candidates:
        if folder and all((folder / name).is_file() for name in FILES):
            verify(folder)
            return folder
    if source_dir:
        raise DataError(f"{source_dir}: does not hold the four Fashion-MNIST IDX files ({', '.join(FILES)})")
    return download(download_cache_dir())


def verify(folder: Path) -> None:
    for name, digest in FILES.items():
        if content_sha256(folder / name) != digest:
            raise DataError(f"{folder / name}: checksum mismatch (corrupt or not the official file)")


def download(folder: Path) -> Path:
    """Fetch the official files into `folder`; a clear error when there is no way to get them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = folder / name
        if target.is_file():
            continue
        try:
            with urllib.request.urlopen(OFFICIAL_URL + name, timeout=30) as response:
                with fileio.atomic_path(target) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ImgclsError(
                f"Fashion-MNIST not found: not installed at {DEBIAN_DIR} (Debian package "
                f"'dataset-fashion-mnist': apt-get install dataset-fashion-mnist), not cached in "
                f"{folder}, and the download from {OFFICIAL_URL} failed ({exc})") from None
    verify(folder)
    return folder


def _write_pngs(args: tuple[Path, list[str], np.ndarray]) -> None:
    folder, ids, images = args
    for image_id, pixels in zip(ids, images):
        Image.fromarray(pixels, mode="L").save(folder / f"{image_id}.png", compress_level=1)


def write_images(folder: Path, ids: list[str], images: np.ndarray, workers: int = 0) -> None:
    """Write PNGs in parallel chunks: ~70k small files is the slow part of the import."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, os.cpu_count() or 1)
    chunks = np.array_split(np.arange(len(ids)), workers * 4)
    jobs = [(folder, [ids[i] for i in c], images[c]) for c in chunks if len(c)]
    if workers == 1:
        for job in jobs:
            _write_pngs(job)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_pngs, jobs))


def write_contest_layout(out: str | os.PathLike, source_dir: Path | None = None,
                         limit_train: int | None = None, limit_test: int | None = None) -> dict:
    """Write OUT/train, OUT/test, OUT/test_labels.csv and OUT/classes.json from the IDX files."""
    out = Path(out)
    folder = locate_source(source_dir)
    train_x = read_idx(folder / "train-images-idx3-ubyte.gz")[:limit_train]
    train_y = read_idx(folder / "train-labels-idx1-ubyte.gz")[:limit_train]
    test_x = read_idx(folder / "t10k-images-idx3-ubyte.gz")[:limit_test]
    test_y = read_idx(folder / "t10k-labels-idx1-ubyte.gz")[:limit_test]
    train_ids = [f"tr{i:05d}" for i in range(len(train_x))]
    test_ids = [f"te{i:05d}" for i in range(len(test_x))]
    write_images(out / "train" / "images", train_ids, train_x)
    write_images(out / "test" / "images", test_ids, test_x)
    fileio.write_text(out / "train" / "train.csv",
                      "id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(train_ids, train_y)))
    fileio.write_text(out / "test" / "test.csv", "id\n" + "".join(f"{i}\n" for i in test_ids))
    fileio.write_text(out / "test_labels.csv",
                      "id,label\n" + "".join(f"{i},{y}\n" for i, y in zip(test_ids, test_y)))
    fileio.write_json(out / "classes.json", {str(i): n for i, n in enumerate(CLASS_NAMES)})
    return {"source": str(folder), "train": len(train_ids), "test": len(test_ids), "out": str(out)}
