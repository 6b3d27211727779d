"""Test-time augmentation: flip averages each image with its mirror image, in every engine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.predict import load_predictor

TRAIN_FAST = ["--model", "scratch-cnn-tiny", "--batch-size", "16", "--precision", "fp32", "--epochs", "2"]


@pytest.fixture
def run(csv_dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    assert main(["train", str(csv_dataset / "train"), "--out", str(out), *TRAIN_FAST]) == 0
    return out


def test_flip_tta_makes_predictions_mirror_invariant(run: Path, csv_dataset: Path) -> None:
    plain = load_predictor(run, device="cpu")
    flip = load_predictor(run, device="cpu", tta="flip")
    images = plain.load(csv_dataset / "test").images
    mirrored = images.flip(2)
    # Without TTA the model sees different pixels; with it, an image and its mirror are the same pair.
    assert not np.allclose(plain.predict_proba(images), plain.predict_proba(mirrored), atol=1e-4)
    np.testing.assert_allclose(flip.predict_proba(images), flip.predict_proba(mirrored), atol=1e-5)
    expected = (plain.predict_proba(images) + plain.predict_proba(mirrored)) / 2
    np.testing.assert_allclose(flip.predict_proba(images), expected, atol=1e-6)
    np.testing.assert_allclose(flip.predict_proba(images).sum(1), 1.0, atol=1e-5)


def test_onnx_engine_applies_the_same_tta(run: Path, csv_dataset: Path) -> None:
    torch_flip = load_predictor(run, device="cpu", tta="flip")
    onnx_flip = load_predictor(run, engine="onnx", tta="flip")
    images = torch_flip.load(csv_dataset / "test").images
    np.testing.assert_allclose(onnx_flip.predict_proba(images), torch_flip.predict_proba(images), atol=1e-4)


def test_cli_evaluate_and_predict_with_tta_agree(run: Path, csv_dataset: Path, tmp_path: Path) -> None:
    key = csv_dataset / "test_labels.csv"
    assert main(["evaluate", str(run), str(csv_dataset / "test"), "--labels", str(key), "--tta", "flip"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["tta"] == "flip"
    submission = tmp_path / "s.csv"
    assert main(["predict", str(run), str(csv_dataset / "test"), "--out", str(submission), "--tta", "flip",
                 "--engine", "torch"]) == 0  # the engine evaluate scores with: auto may pick another
    with open(key, newline="") as fh:
        truth = dict(list(csv.reader(fh))[1:])
    with open(submission, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert sum(truth[i] == label for i, label in rows) / len(rows) == pytest.approx(evaluation["accuracy"])


def test_unknown_tta_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid: none, flip, flip-shift"):
        load_predictor(tmp_path / "no-such-run", tta="rotate")


def test_flip_shift_views_are_the_image_and_mirror_each_moved_one_pixel_both_ways() -> None:
    import torch

    from imgcls.predict import tta_views

    images = torch.arange(2 * 4 * 5, dtype=torch.uint8).view(2, 4, 5, 1)  # NHWC
    views = tta_views(images, "flip-shift")
    assert len(views) == 6 and all(v.shape == images.shape for v in views)
    same, mirror, down_right, _, up_left, up_left_mirror = views
    assert torch.equal(same, images) and torch.equal(mirror, images.flip(2))
    assert torch.equal(down_right[:, 1:, 1:], images[:, :-1, :-1])  # content moved by (+1, +1)
    assert torch.equal(down_right[:, 0, 1:], images[:, 0, :-1])  # the top edge row repeated
    assert torch.equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
    assert torch.equal(up_left_mirror, up_left.flip(2))
