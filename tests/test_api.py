"""The Python API: train / load / Model.predict on every kind of input gives the CLI's answers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgcls
from imgcls.api import OptionError
from imgcls.cli import main
from imgcls.errors import DataError


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A small scratch-cnn run on the 16x16 glyphs, and its CLI submission for the test folder."""
    from conftest import make_csv_dataset

    base = tmp_path_factory.mktemp("api")
    data = make_csv_dataset(base / "ds", n_per_class=20, n_test=12)
    model = imgcls.train(data / "train", out=base / "run", epochs=3, seed=0, precision="fp32", log=lambda _: None)
    submission = base / "submission.csv"
    assert main(["predict", str(base / "run"), str(data / "test"), "--out", str(submission),
                 "--engine", "torch"]) == 0  # the engine imgcls.load uses: auto may pick another
    with submission.open(newline="") as fh:
        cli = {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}
    return model, data, cli


def test_train_returns_a_model_whose_labels_keep_their_type(trained) -> None:
    model, _, _ = trained
    assert model.classes_ == [0, 1, 2] and all(type(c) is int for c in model.classes_)
    assert "scratch-cnn" in repr(model) and "3 classes" in repr(model)


def test_paths_lists_and_folders_give_the_cli_labels(trained) -> None:
    model, data, cli = trained
    ids = sorted(cli)
    paths = [data / "test" / "images" / f"{i}.png" for i in ids]
    assert model.predict(paths) == [cli[i] for i in ids]
    assert model.predict(str(paths[0])) == [cli[ids[0]]]
    assert model.predict(data / "test") == [cli[i] for i in ids]  # a dataset folder with test.csv
    assert model.predict(data / "test" / "images") == [cli[i] for i in ids]  # loose images, sorted by name


def test_pil_images_and_arrays_of_other_sizes_and_channels_are_resized_like_training(trained) -> None:
    model, data, cli = trained
    ids = sorted(cli)
    grey = [np.asarray(Image.open(data / "test" / "images" / f"{i}.png")) for i in ids]
    expected = [cli[i] for i in ids]
    assert model.predict([Image.fromarray(g) for g in grey]) == expected
    assert model.predict(np.stack(grey)) == expected  # N x H x W
    assert model.predict(np.stack(grey)[..., None]) == expected  # N x H x W x 1
    assert model.predict(torch.from_numpy(np.stack(grey))[:, None]) == expected  # N x C x H x W tensor
    assert model.predict(np.stack(grey).astype(np.float32) / 255) == expected  # floats in [0, 1]
    # RGB at another size: through the same grey conversion and resize as the decoder's.
    rgb_big = [np.asarray(Image.fromarray(g).convert("RGB").resize((48, 48), Image.BILINEAR)) for g in grey]
    direct = model.predict([Image.fromarray(a) for a in rgb_big])
    assert model.predict(np.stack(rgb_big)) == direct
    images = model.images(np.stack(rgb_big))
    assert images.shape == (len(ids), 16, 16, 1) and images.dtype == torch.uint8


def test_predict_proba_rows_sum_to_one_in_class_order(trained) -> None:
    model, data, _ = trained
    proba = model.predict_proba(data / "test")
    assert proba.shape == (12, 3)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert [model.classes_[i] for i in proba.argmax(1)] == model.predict(data / "test")


def test_evaluate_scores_against_an_answer_key(trained) -> None:
    model, data, cli = trained
    metrics = model.evaluate(data / "test", labels=data / "test_labels.csv")
    with (data / "test_labels.csv").open(newline="") as fh:
        truth = {row["id"]: int(row["label"]) for row in csv.DictReader(fh)}
    assert metrics["accuracy"] == pytest.approx(np.mean([cli[i] == truth[i] for i in truth]))


def test_load_reads_the_run_folder_back(trained) -> None:
    model, data, _ = trained
    again = imgcls.load(model.run_dir)
    np.testing.assert_allclose(again.predict_proba(data / "test"), model.predict_proba(data / "test"), atol=1e-6)


def test_unknown_options_and_inputs_fail_in_one_line(trained, tmp_path: Path) -> None:
    model, _, _ = trained
    with pytest.raises(OptionError, match="unknown training option.*epoch.*valid: .*epochs"):
        imgcls.train(tmp_path, out=tmp_path / "r", epoch=3)
    with pytest.raises(DataError, match="cannot read dict"):
        model.predict({"a": 1})
    with pytest.raises(DataError, match="shape"):
        model.predict(np.zeros((1, 2, 3, 4, 5)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        model.predict(empty)


def test_a_loose_folder_refuses_links_that_leave_it(trained, tmp_path: Path) -> None:
    model, data, _ = trained
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(data / "test" / "images" / "te0000.png", loose / "a.png")
    (loose / "b.png").symlink_to(data / "test" / "images" / "te0001.png")
    with pytest.raises(DataError, match="b.png is a symbolic link"):
        model.predict(loose)


def readme_python_example() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Python", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs_as_written_on_fashion_mnist(tmp_path: Path, monkeypatch, capsys) -> None:
    """The README's block, verbatim, on a small import of the real Fashion-MNIST files."""
    assert main(["data", "fashion-mnist", str(tmp_path / "data" / "fashion-mnist"),
                 "--limit-train", "300", "--limit-test", "30"]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md", "exec"), scope)
    assert isinstance(scope["model"], imgcls.Model)
    assert scope["proba"].shape == (30, 10)
    assert 0.2 < scope["metrics"]["accuracy"] <= 1.0  # 10 classes: chance is 0.1
    [label] = scope["model"].predict("data/fashion-mnist/test/images/te00000.png")
    assert type(label) is int and label in range(10)


def test_photos_through_the_api_get_the_runs_resize_policy(tmp_path: Path) -> None:
    """Paths, PIL images and arrays of mixed-shape photos: the same pixels as the dataset path of a pad run."""
    from test_photos import make_photo_dir, photo_run

    photos = make_photo_dir(tmp_path / "photos")
    model = imgcls.load(photo_run(photos, tmp_path / "run", "pad"), device="cpu")
    data = model.predictor.load(photos)
    by_id = {Path(i).stem: row for i, row in zip(data.ids, data.images)}
    files = sorted((photos / "images").iterdir())
    for path in files:
        assert torch.equal(model.images(path)[0], by_id[path.stem])
        assert torch.equal(model.images(Image.open(path))[0], by_id[path.stem])
    pngs = [p for p in files if p.suffix == ".png"]  # JPEG files decode at reduced scale: not an array's path
    assert pngs and all(torch.equal(model.images(np.asarray(Image.open(p)))[0], by_id[p.stem]) for p in pngs)
