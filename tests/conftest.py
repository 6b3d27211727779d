"""Tiny synthetic datasets written as real PNG + CSV files, in both layouts."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

# One intra-op thread for the tests and every command they start (set before torch is imported):
# on tensors this small a second thread only adds synchronisation, and on a busy machine OpenMP
# threads that spin while they wait compete with the other work for the cores. Tests that need
# another count set it themselves (the server's workers, the golden runs).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

SIZE = 16
CLASS_NAMES = ["circle", "square", "bar"]
# How long a test waits for something that must happen (a subprocess to finish, a server to answer,
# a thread to be released) before it calls it hung. Only a hang comes near it, on any machine at any
# load: a limit a slow machine can reach would make the test depend on its speed.
HANG_S = 1800


def draw(cls: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A learnable grey glyph: filled disc, hollow square or vertical bar, with jitter and noise."""
    img = np.zeros((size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    if cls == 0:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 4) ** 2] = 1
    elif cls == 1:
        r = size // 4
        y0, x0 = int(cy) - r, int(cx) - r
        img[y0:y0 + 2 * r, x0:x0 + 2 * r] = 1
        img[y0 + 2:y0 + 2 * r - 2, x0 + 2:x0 + 2 * r - 2] = 0
    else:
        img[:, int(cx) - 1:int(cx) + 2] = 1
    img += rng.normal(0, 0.1, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def make_csv_dataset(root: Path, n_per_class: int = 12, n_test: int = 9, seed: int = 0,
                     string_labels: bool = False, with_ext: bool = False) -> Path:
    """root/train/{train.csv,images/}, root/test/{test.csv,images/}, root/test_labels.csv."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_per_class * len(CLASS_NAMES)), ("test", n_test)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            cls = i % len(CLASS_NAMES)
            image_id = f"{split[:2]}{i:04d}"
            Image.fromarray(draw(cls, rng), mode="L").save(root / split / "images" / f"{image_id}.png")
            label = CLASS_NAMES[cls] if string_labels else cls
            rows.append((image_id + (".png" if with_ext else ""), label))
        with open(root / split / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            if split == "train":
                writer.writerow(["id", "label"])
                writer.writerows(rows)
            else:
                writer.writerow(["id"])
                writer.writerows([(r[0],) for r in rows])
                with open(root / "test_labels.csv", "w", newline="") as key:
                    kw = csv.writer(key)
                    kw.writerow(["id", "label"])
                    kw.writerows(rows)
    if not string_labels:
        (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CLASS_NAMES)}))
    return root


def make_folder_dataset(root: Path, n_per_class: int = 8, seed: int = 1, rgb: bool = False) -> Path:
    """root/<class>/<image>.png (the class-subfolder layout)."""
    rng = np.random.default_rng(seed)
    for cls, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = draw(cls, rng)
            image = Image.fromarray(pixels, mode="L")
            (image.convert("RGB") if rgb else image).save(root / name / f"img{i:03d}.png")
    return root


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    """Contest layout with integer labels, ids without extension, and an answer key."""
    return make_csv_dataset(tmp_path / "ds")


@pytest.fixture
def string_dataset(tmp_path: Path) -> Path:
    """Contest layout with string labels and ids that carry the .png extension."""
    return make_csv_dataset(tmp_path / "ds_str", string_labels=True, with_ext=True)


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "folders")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep decode caches and downloads inside the test's temp folder."""
    monkeypatch.setenv("IMGCLS_HOME", str(tmp_path / "imgcls_home"))
