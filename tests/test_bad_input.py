"""Bad input: one clear line naming the file and row (or column), a non-zero exit, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgcls import fileio
from imgcls.cli import main

TRAIN_FAST = ["--model", "scratch-cnn-tiny", "--epochs", "1", "--batch-size", "16", "--precision", "fp32"]


def train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(data), "--out", str(out), *TRAIN_FAST, *extra])


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("imgcls: error: ")
    return err


def rewrite_csv(data: Path, text: str) -> None:
    (data / "train" / "train.csv").write_text(text)


def test_missing_csv(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    (csv_dataset / "train" / "train.csv").unlink()
    (csv_dataset / "train" / "images" / "tr0000.png").rename(csv_dataset / "train" / "stray.png")
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    assert "no CSV file" in error_of(capsys)


def test_missing_id_column(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    rewrite_csv(csv_dataset, "picture,label\ntr0000,0\n")
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "train.csv" in err and "no id column" in err and "picture" in err


def test_missing_label_column(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    rewrite_csv(csv_dataset, "id,kind\ntr0000,0\n")
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    assert "no label column" in error_of(capsys)


def test_explicit_column_that_does_not_exist(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    assert train(csv_dataset / "train", tmp_path / "r", "--label-column", "species") != 0
    assert "no column 'species'" in error_of(capsys)


@pytest.mark.parametrize("text", ["", "id,label\n"])
def test_empty_csv(csv_dataset: Path, tmp_path: Path, capsys, text: str) -> None:
    rewrite_csv(csv_dataset, text)
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    assert "empty CSV" in error_of(capsys)


def test_duplicate_ids(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    rewrite_csv(csv_dataset, "id,label\ntr0000,0\ntr0001,1\ntr0000,2\n")
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "train.csv row 4" in err and "duplicate id 'tr0000'" in err and "row 2" in err


def test_missing_image_file(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    (csv_dataset / "train" / "images" / "tr0005.png").unlink()
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "train.csv row 7" in err and "no image file for id 'tr0005'" in err


def test_file_that_is_not_an_image(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    (csv_dataset / "train" / "images" / "tr0003.png").write_text("hello, not a picture")
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "tr0003.png" in err and "train.csv row 5" in err and "not an image" in err
    assert not (tmp_path / "r" / "model.safetensors").exists()  # stopped before any training


def test_truncated_png(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    path = csv_dataset / "train" / "images" / "tr0002.png"
    path.write_bytes(path.read_bytes()[:60])
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "tr0002.png" in err and "row 4" in err and "truncated or corrupt" in err


def test_answer_key_label_that_is_not_a_training_class(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    assert train(csv_dataset / "train", tmp_path / "r") == 0
    key = csv_dataset / "test_labels.csv"
    lines = key.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",7"
    key.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), str(csv_dataset / "test"), "--labels", str(key)]) != 0
    err = error_of(capsys)
    assert "test_labels.csv row 4" in err and "label '7' is not a training class" in err


def test_answer_key_missing_an_id(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    assert train(csv_dataset / "train", tmp_path / "r") == 0
    key = csv_dataset / "test_labels.csv"
    key.write_text("\n".join(key.read_text().splitlines()[:-1]) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "r"), str(csv_dataset / "test"), "--labels", str(key)]) != 0
    assert "no label for id 'te0008'" in error_of(capsys)


def test_output_folder_with_a_different_run_is_refused(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert train(csv_dataset / "train", out) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert train(csv_dataset / "train", out, "--seed", "5") != 0
    err = error_of(capsys)
    assert "holds a different run" in err and "seed: 0 -> 5" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before  # nothing lost
    assert train(csv_dataset / "train", out, "--seed", "5", "--overwrite") == 0
    assert '"seed": 5' in (out / "config.json").read_text()


def test_output_folder_that_is_not_a_run_is_never_deleted(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert train(csv_dataset / "train", out) != 0
    assert "holds no run" in error_of(capsys)
    assert train(csv_dataset / "train", out, "--overwrite") != 0
    assert (out / "notes.txt").read_text() == "keep me"


def test_unknown_model_lists_valid_ones(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", str(csv_dataset / "train"), "--out", str(tmp_path / "r"), "--model", "nope-net"]) != 0
    err = error_of(capsys)
    assert "unknown model 'nope-net'" in err and "scratch-cnn" in err


def test_missing_dataset_folder(tmp_path: Path, capsys) -> None:
    assert train(tmp_path / "nowhere", tmp_path / "r") != 0
    assert "no such dataset folder" in error_of(capsys)


def strict_json(text: str):
    """Parse JSON as other tools do: NaN and Infinity are not JSON."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    fileio.write_json(tmp_path / "a.json", {"acc": nan, "xs": [1.5, inf, -inf], "deep": {"loss": (nan,)}})
    assert strict_json((tmp_path / "a.json").read_text()) == {"acc": None, "xs": [1.5, None, None],
                                                              "deep": {"loss": [None]}}
    fileio.append_jsonl(tmp_path / "m.jsonl", {"val_acc": nan})
    assert strict_json((tmp_path / "m.jsonl").read_text()) == {"val_acc": None}


def test_two_classes_of_one_image_each_give_valid_json(csv_dataset: Path, tmp_path: Path) -> None:
    """No image is left to validate on: accuracy is unknown, written as null, never as bare NaN."""
    rewrite_csv(csv_dataset, "id,label\ntr0000,0\ntr0001,1\n")
    out = tmp_path / "r"
    assert train(csv_dataset / "train", out) == 0
    run = strict_json((out / "run.json").read_text())
    assert run["status"] == "complete" and run["data"]["val"] == 0 and run["best_val_acc"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert strict_json(line)["val_acc"] is None
    for path in out.glob("*.json"):
        strict_json(path.read_text())
