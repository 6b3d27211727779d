"""Bad input: one clear line naming the file and row (or column), a non-zero exit, no traceback."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from PIL import Image

from imgcls import fileio
from imgcls.cli import main
from imgcls.errors import OutputError

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


def test_two_classes_of_one_image_each_give_valid_json(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    """No image is left to validate on: accuracy is unknown, written as null, never as bare NaN."""
    rewrite_csv(csv_dataset, "id,label\ntr0000,0\ntr0001,1\n")
    out = tmp_path / "r"
    assert train(csv_dataset / "train", out) == 0
    printed = capsys.readouterr().out
    assert "no validation split: kept the last model" in printed and "nan" not in printed.lower()
    run = strict_json((out / "run.json").read_text())
    assert run["status"] == "complete" and run["data"]["val"] == 0 and run["best_val_acc"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        assert strict_json(line)["val_acc"] is None
    for path in out.glob("*.json"):
        strict_json(path.read_text())


def relabel(data: Path, label_of) -> None:
    """Rewrite train.csv's labels as label_of(row index)."""
    lines = (data / "train" / "train.csv").read_text().splitlines()
    rewrite_csv(data, lines[0] + "\n" + "".join(f"{line.split(',')[0]},{label_of(i)}\n"
                                                for i, line in enumerate(lines[1:])))


def shrink_images(data: Path, size: tuple[int, int] = (3, 3)) -> None:
    for path in (data / "train" / "images").glob("*.png"):
        Image.open(path).resize(size).save(path)


def only_two_images(data: Path) -> None:
    rewrite_csv(data, "id,label\ntr0000,0\ntr0001,1\n")


# What `check` and `train` each make of a dataset: fatal for one is fatal for the other.
FATAL = {
    "one_class": (lambda data: relabel(data, lambda i: 0), "single_class", "only one class"),
    "missing_label_marker": (lambda data: relabel(data, lambda i: "N/A" if i == 4 else i % 3), "empty_label",
                             "missing label"),
    "images_too_small_for_the_network": (shrink_images, "too_small", "below scratch-cnn"),
}
HANDLED = {"one_image_per_class": (only_two_images, "small_class")}


@pytest.mark.parametrize("case", sorted(FATAL))
def test_what_train_refuses_check_reports_as_an_error(csv_dataset: Path, tmp_path: Path, capsys,
                                                       case: str) -> None:
    from imgcls.check import PROBLEMS_EXIT_CODE, check_dataset

    damage, kind, says = FATAL[case]
    damage(csv_dataset)
    report = check_dataset(csv_dataset / "train")
    assert kind in {p["kind"] for p in report.errors}, report.summary()
    assert main(["check", str(csv_dataset / "train"), "--report", str(tmp_path / "c.json")]) == PROBLEMS_EXIT_CODE
    capsys.readouterr()
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    assert says in error_of(capsys)
    assert not (tmp_path / "r").exists()  # refused before any file of the run was written


@pytest.mark.parametrize("case", sorted(HANDLED))
def test_what_train_handles_check_reports_as_a_warning(csv_dataset: Path, tmp_path: Path, case: str) -> None:
    from imgcls.check import check_dataset

    damage, kind = HANDLED[case]
    damage(csv_dataset)
    report = check_dataset(csv_dataset / "train")
    assert not report.errors and kind in {p["kind"] for p in report.warnings}
    assert train(csv_dataset / "train", tmp_path / "r") == 0


def test_class_folder_named_like_a_missing_value(folder_dataset: Path, tmp_path: Path, capsys) -> None:
    from imgcls.check import check_dataset

    (folder_dataset / "bar").rename(folder_dataset / "NaN")
    report = check_dataset(folder_dataset)
    assert "empty_label" in {p["kind"] for p in report.errors} and "NaN" not in report.classes
    assert train(folder_dataset, tmp_path / "r") != 0
    err = error_of(capsys)
    assert "NaN" in err and "missing label" in err


def test_small_images_train_once_enlarged(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    shrink_images(csv_dataset)
    assert train(csv_dataset / "train", tmp_path / "r") != 0
    err = error_of(capsys)
    assert "3x3 px" in err and "--image-size 8" in err and len(err.strip().splitlines()) == 1
    assert train(csv_dataset / "train", tmp_path / "r", "--image-size", "8") == 0


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_mid_write_is_one_line_and_keeps_the_earlier_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "run.json"
    fileio.write_json(target, {"epoch": 1})
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", no_space)
        with pytest.raises(OutputError) as caught:
            fileio.write_json(target, {"epoch": 2})
    assert str(caught.value) == f"{target}: cannot write (No space left on device)"
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert not list(target.parent.glob(".*.tmp"))


def test_a_read_only_output_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root chmod cannot make a folder read-only: the refusal is simulated where the OS gives it."""
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", dir)
    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputError, match=r"report.json: cannot write \(Read-only file system\)$"):
        fileio.write_json(tmp_path / "report.json", {})


class FullDisk:
    """A file whose disk is full: each write fails with ENOSPC, as the OS reports it."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        self.fh.flush()


def test_training_on_a_disk_that_fills_up_keeps_the_last_checkpoint(csv_dataset: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys) -> None:
    """The second checkpoint meets a full disk. Written to a path, torch reports that as a bare
    RuntimeError (checked on /dev/full); written to a Python file, as the OSError imgcls can name."""
    import torch

    from imgcls.train import checkpoint

    real_save, saves = torch.save, []

    def fills_up(obj, target, *args, **kwargs):
        saves.append(target)
        if len(saves) < 2:
            return real_save(obj, target, *args, **kwargs)
        if isinstance(target, (str, Path)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, FullDisk(target), *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fills_up)
    out = tmp_path / "r"
    code = train(csv_dataset / "train", out, "--epochs", "3")
    err = error_of(capsys)
    assert code == OutputError.exit_code, err
    assert err.strip() == f"imgcls: error: {out / 'checkpoint.pt'}: cannot write (No space left on device)"
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the earlier one is intact
    assert not list(out.glob(".*.tmp"))
    assert train(csv_dataset / "train", out, "--epochs", "3") == 0  # and the run resumes from it


def test_output_paths_that_cannot_be_files_are_one_line(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    assert train(csv_dataset / "train", run) == 0
    test = str(csv_dataset / "test")
    folder = tmp_path / "some_dir"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine too")
    capsys.readouterr()
    cases = {
        str(folder) + "/": f"{folder}: is a folder",
        str(a_file / "sub.csv"): f"{a_file / 'sub.csv'}: cannot write ({a_file} is a file, not a folder)",
    }
    for out, says in cases.items():
        assert main(["predict", str(run), test, "--out", out]) == OutputError.exit_code
        err = error_of(capsys)
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert train(csv_dataset / "train", a_file / "run") == OutputError.exit_code
    assert f"{a_file} is a file, not a folder" in error_of(capsys)
    assert main(["check", str(csv_dataset / "train"), "--report", str(folder)]) == OutputError.exit_code
    assert f"{folder}: is a folder" in error_of(capsys)
    assert (folder / "keep.txt").read_text() == "mine" and a_file.read_text() == "mine too"


class Payload:
    """Unpickling this creates `marker`: stands in for the code a planted file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins
        return (builtins.open, (str(self.marker), "w"))


def test_a_pickle_payload_as_weights_is_refused_in_one_line(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    import torch

    marker, evil = tmp_path / "pwned", tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(3, 2), "note": Payload(marker)}, evil)
    assert train(csv_dataset / "train", tmp_path / "r", "--weights", str(evil)) != 0
    err = error_of(capsys)
    assert err.strip() == (f"imgcls: error: {evil}: refused to load: not a weights-only file (it holds Python "
                           "objects besides tensors, and unpickling them could run code)")
    assert not marker.exists()


def test_a_planted_resume_checkpoint_is_refused_in_one_line(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    import torch

    out, marker = tmp_path / "r", tmp_path / "pwned"
    assert train(csv_dataset / "train", out, "--epochs", "2") == 0
    (out / "run.json").unlink()  # an interrupted run: the next one resumes from checkpoint.pt
    torch.save({"model": {}, "epoch": 1, "note": Payload(marker)}, out / "checkpoint.pt")
    capsys.readouterr()
    assert train(csv_dataset / "train", out, "--epochs", "2") != 0
    err = error_of(capsys)
    assert len(err.strip().splitlines()) == 1 and "weights_only=False" not in err
    assert f"{out / 'checkpoint.pt'}: unreadable resume checkpoint: refused to load: not a weights-only file" in err
    assert not marker.exists()
