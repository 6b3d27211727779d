"""The data layer: both layouts, id/extension resolution, label forms, cache, split, IDX reader."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import load_dataset
from imgcls.data.classes import ClassMap
from imgcls.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, FILES, read_idx
from imgcls.data.split import per_class_subset, stratified_split
from imgcls.data.table import read_dataset
from imgcls.data.transforms import Augment, Preprocess, parse_augment
from imgcls.errors import DataError


def test_csv_layout_reads_ids_labels_and_images(csv_dataset: Path) -> None:
    data = load_dataset(csv_dataset / "train")
    assert len(data.ids) == 36
    assert data.images.shape == (36, 16, 16, 1)  # greyscale stays one channel
    assert data.classes.labels == ("0", "1", "2") and data.classes.integer_labels
    assert data.classes.names == ("circle", "square", "bar")  # from classes.json above train/
    assert data.targets.tolist()[:3] == [0, 1, 2]


def test_ids_with_extension_and_string_labels(string_dataset: Path) -> None:
    data = load_dataset(string_dataset / "train")
    assert data.ids[0].endswith(".png")
    assert data.classes.labels == ("bar", "circle", "square")  # stable sorted order
    assert not data.classes.integer_labels
    assert data.classes.decode([0, 2]) == ["bar", "square"]


def test_class_folder_layout(folder_dataset: Path) -> None:
    data = load_dataset(folder_dataset)
    assert len(data.ids) == 24
    assert set(data.classes.labels) == {"circle", "square", "bar"}
    assert data.ids[0].count("/") == 1


def test_extension_resolution_is_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("L", (8, 8), 10).save(tmp_path / "images" / "A1.PNG")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / "b2.jpeg")
    (tmp_path / "x.csv").write_text("filename,class\na1,cat\nB2,dog\n")
    table = read_dataset(tmp_path)
    assert [p.name for p in table.paths] == ["A1.PNG", "b2.jpeg"]
    assert table.id_column == "filename" and table.label_column == "class"


def test_mixed_modes_become_rgb_and_mixed_sizes_are_resized(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("L", (10, 10), 200).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (10, 10), (255, 0, 0)).save(tmp_path / "images" / "b.png")
    Image.new("RGBA", (20, 14), (0, 0, 255, 255)).save(tmp_path / "images" / "c.png")
    (tmp_path / "t.csv").write_text("id,label\na,x\nb,y\nc,x\n")
    data = load_dataset(tmp_path)
    assert data.images.shape == (3, 10, 10, 3)
    assert data.images[0, 0, 0].tolist() == [200, 200, 200]
    assert data.images[1, 5, 5].tolist() == [255, 0, 0]
    assert data.images[2, 5, 5].tolist() == [0, 0, 255]


def test_integer_labels_are_normalised(tmp_path: Path) -> None:
    cm = ClassMap.from_labels(["10", "2", "02", "1"])
    assert cm.labels == ("1", "2", "10")  # numeric, not lexical, order
    assert cm.encode(["02", "10"]).tolist() == [1, 2]
    assert cm.decode([2]) == [10]


def test_cache_is_reused_and_invalidated_when_a_file_changes(csv_dataset: Path) -> None:
    first = load_dataset(csv_dataset / "train")
    assert not first.from_cache
    second = load_dataset(csv_dataset / "train")
    assert second.from_cache and np.array_equal(first.images, second.images)
    target = csv_dataset / "train" / "images" / "tr0000.png"
    Image.new("L", (16, 16), 77).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = load_dataset(csv_dataset / "train")
    assert not third.from_cache
    assert int(third.images[0].float().mean()) == 77


def test_cache_is_invalidated_when_the_csv_changes(csv_dataset: Path) -> None:
    load_dataset(csv_dataset / "train")
    csv_file = csv_dataset / "train" / "train.csv"
    lines = csv_file.read_text().splitlines()
    csv_file.write_text("\n".join(lines[:-3]) + "\n")
    again = load_dataset(csv_dataset / "train")
    assert not again.from_cache and len(again.ids) == 33


def test_stratified_split_is_seeded_and_keeps_class_shares() -> None:
    targets = np.repeat(np.arange(4), 50)
    train, val = stratified_split(targets, 0.1, seed=3)
    assert len(val) == 20 and np.bincount(targets[val]).tolist() == [5, 5, 5, 5]
    assert not set(train) & set(val) and len(train) + len(val) == 200
    again = stratified_split(targets, 0.1, seed=3)[1]
    other = stratified_split(targets, 0.1, seed=4)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    assert np.bincount(targets[per_class_subset(targets, 7, 0)]).tolist() == [7, 7, 7, 7]


def test_augment_shift_moves_content_and_flip_mirrors() -> None:
    x = torch_arange_image()
    gen = __import__("torch").Generator().manual_seed(0)
    flipped = Augment(flip=True, shift=0)(x.repeat(64, 1, 1, 1), gen)
    mirrored = (flipped == x.flip(3)).all(dim=(1, 2, 3))
    assert 0 < int(mirrored.sum()) < 64  # about half of the batch flipped
    shifted = Augment(flip=False, shift=2)(x.repeat(32, 1, 1, 1), gen)
    assert shifted.shape == (32, 1, 6, 6)
    assert not all((s == x[0]).all() for s in shifted)  # most samples moved
    assert parse_augment("none") is None and parse_augment("flip-shift4") == Augment(True, 4)
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment("rotate")


def test_training_shift_counts_stored_pixels_whatever_the_model_input_size() -> None:
    """A 1 px shift of an 8 px image moves the content by 4 px of the model's 32 px input."""
    import torch
    image = torch.zeros(1, 8, 8, 1, dtype=torch.uint8)
    image[0, 3:5, 3:5, 0] = 255
    pre = Preprocess((0.0,), (1.0,), 1, (32, 32))
    gen = torch.Generator().manual_seed(0)
    plain = pre(image)
    moved = pre(image.repeat(64, 1, 1, 1), augment=Augment(flip=False, shift=1), generator=gen)

    def centroid(x):  # (row, col) of the bright square
        w = x[:, 0]
        rows, cols = torch.arange(32.0).view(1, 32, 1), torch.arange(32.0).view(1, 1, 32)
        return torch.stack([(w * rows).sum((1, 2)) / w.sum((1, 2)), (w * cols).sum((1, 2)) / w.sum((1, 2))], 1)

    offsets = centroid(moved) - centroid(plain)
    assert set(offsets.round().flatten().tolist()) == {-4.0, 0.0, 4.0}
    assert torch.allclose(offsets, offsets.round(), atol=1e-4)
    assert parse_augment("flip-shift") == Augment(True, 2) and parse_augment("auto", n_train=50_000) == Augment(True, 0)


def test_erase_blanks_one_box_per_picked_sample_and_nothing_else() -> None:
    import torch
    x = torch.ones(400, 1, 20, 20)
    out = Augment(flip=False, shift=0, erase=0.5)(x, torch.Generator().manual_seed(0))
    erased = (out == 0).flatten(1).sum(1)
    assert 120 < int((erased > 0).sum()) < 280  # about half of the samples picked
    share = erased[erased > 0].float() / 400
    assert share.min() >= 0.005 and share.max() <= 0.5  # 2-25% areas, after rounding box sides
    assert set(out.unique().tolist()) == {0.0, 1.0}  # pixels are kept or blanked, never altered
    boxes = [torch.nonzero(o[0] == 0) for o in out if (o == 0).any()]
    for b in boxes[:50]:  # each blank region is one filled rectangle
        h, w = int(b[:, 0].max() - b[:, 0].min() + 1), int(b[:, 1].max() - b[:, 1].min() + 1)
        assert h * w == len(b)
    assert parse_augment("flip-shift4-erase") == Augment(True, 4, 0.5)


def torch_arange_image():
    import torch
    return torch.arange(36, dtype=torch.float32).view(1, 1, 6, 6) + 1


def test_preprocess_normalises_repeats_grey_and_resizes() -> None:
    import torch
    batch = torch.full((2, 4, 4, 1), 255, dtype=torch.uint8)
    x = Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), in_chans=3, image_size=(8, 8))(batch)
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x, torch.ones_like(x))


def test_idx_reader_on_real_fashion_mnist() -> None:
    assert all((DEBIAN_DIR / name).is_file() for name in FILES), "apt-get install dataset-fashion-mnist"
    labels = read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # Ankle boot, Pullover, Trouser, Trouser, Shirt
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == "Ankle boot"


def test_idx_reader_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "x-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # header says 5 bytes, body has 3
    with pytest.raises(DataError, match="header says 5"):
        read_idx(bad)
