"""imgcls check: every kind of problem found with its file and row, and train gated by the same checks."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import draw, make_folder_dataset
from imgcls.check import PROBLEMS_EXIT_CODE, check_dataset
from imgcls.cli import main
from imgcls.errors import DataError


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature + IHDR claiming width x height, with no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def grey(size: tuple[int, int] = (16, 16), seed: int = 0) -> Image.Image:
    return Image.fromarray(draw(seed % 3, np.random.default_rng(seed), size[0])[: size[0], : size[1]], mode="L")


# (id, label, how the file is made); rows start at CSV line 2.
MESSY_ROWS = [
    ("a0", "cat", "grey"), ("a1", "cat", "grey"), ("a2", "dog", "grey"), ("a3", "dog", "grey"),
    ("a4", "dog", "grey"),
    ("a0", "dog", None),            # row 7: duplicate id
    ("ghost", "cat", None),         # row 8: no image file
    ("empty", "cat", "zero"),       # row 9
    ("trunc", "dog", "truncated"),  # row 10
    ("text", "cat", "text"),        # row 11
    ("bomb", "dog", "bomb"),        # row 12
    ("cmyk", "cat", "cmyk"), ("rgba", "dog", "rgba"), ("pal", "cat", "palette"), ("deep", "dog", "16bit"),
    ("tiny", "cat", "tiny"),        # row 17
    ("wide", "dog", "wide"),        # row 18
    ("lone", "Cat", "grey"),        # row 19: 'Cat' vs 'cat', and a one-image class
]


def write_image(path: Path, how: str, seed: int) -> None:
    """One file of the kind named by `how`."""
    if how == "grey":
        grey(seed=seed).save(path)
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "truncated":
        grey(seed=seed).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif how == "text":
        path.write_text("id,label\nthis is not an image\n")
    elif how == "bomb":
        png_header_only(path, 100_000, 100_000)
    elif how == "cmyk":
        grey(seed=seed).convert("CMYK").save(path.with_suffix(".jpg"))
    elif how == "rgba":
        grey(seed=seed).convert("RGBA").save(path)
    elif how == "palette":
        grey(seed=seed).convert("RGB").convert("P").save(path)
    elif how == "16bit":
        Image.fromarray((np.asarray(grey(seed=seed), dtype=np.uint16) * 257)).save(path)
    elif how == "tiny":
        grey((4, 4), seed).save(path)
    elif how == "wide":
        Image.new("L", (5000, 10), 128).save(path)


def make_messy(root: Path) -> Path:
    """A CSV dataset with one of every problem the checker knows, plus an orphan image."""
    images = root / "images"
    images.mkdir(parents=True)
    for seed, (image_id, _, how) in enumerate(MESSY_ROWS):
        if how:
            write_image(images / f"{image_id}.png", how, seed)
    grey(seed=99).save(images / "orphan.png")
    lines = ["id,label"] + [f"{image_id},{label}" for image_id, label, _ in MESSY_ROWS]
    (root / f"{root.name}.csv").write_text("\n".join(lines) + "\n")
    return root


def by_kind(report) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in report.problems:
        out.setdefault(p["kind"], []).append(p)
    return out


def test_clean_dataset_exits_zero_and_writes_report(csv_dataset: Path, capsys) -> None:
    assert main(["check", str(csv_dataset / "train")]) == 0
    report = json.loads((csv_dataset / "train" / "check_report.json").read_text())
    assert report["clean"] and report["problems"] == []
    assert report["rows"] == 36 and report["image_files"] == 36
    assert report["classes"] == {"0": 12, "1": 12, "2": 12}
    assert report["modes"] == {"L": 36} and report["sizes"]["most_common"] == [16, 16]
    assert "clean" in capsys.readouterr().out


def test_every_problem_is_found_with_file_and_row(tmp_path: Path) -> None:
    report = check_dataset(make_messy(tmp_path / "train"))
    kinds = by_kind(report)
    rows = {kind: sorted(p["row"] for p in ps if p["row"]) for kind, ps in kinds.items()}
    assert rows["duplicate_id"] == [7]
    assert rows["missing_image"] == [8]
    assert rows["bad_image"] == [9, 10, 11, 12]
    reasons = {p["row"]: p["reason"] for p in kinds["bad_image"]}
    assert "0 bytes" in reasons[9] and "truncated" in reasons[10]
    assert "not an image" in reasons[11] and "decompression bomb" in reasons[12]
    assert [Path(p["file"]).name for p in kinds["orphan_image"]] == ["orphan.png"]
    assert rows["small_image"] == [17] and rows["large_image"] == [18]
    assert "'Cat', 'cat'" in kinds["label_variants"][0]["reason"]
    assert [p["reason"].split("'")[1] for p in kinds["small_class"]] == ["Cat"]
    assert {p["severity"] for k in ("duplicate_id", "missing_image", "bad_image") for p in kinds[k]} == {"error"}
    assert len(report.errors) == 6 and report.exit_code == PROBLEMS_EXIT_CODE
    # CMYK was saved as .jpg next to a CSV id without extension: it resolves and is converted.
    assert {"CMYK", "RGBA", "P"} <= set(report.conversions)
    assert any(m.startswith("I") for m in report.conversions), report.modes
    assert report.classes == {"dog": 6, "cat": 5, "Cat": 1}


def test_cli_exit_code_and_summary_for_problems(tmp_path: Path, capsys) -> None:
    data = make_messy(tmp_path / "train")
    out = tmp_path / "elsewhere" / "report.json"
    assert main(["check", str(data), "--report", str(out)]) == PROBLEMS_EXIT_CODE
    text = capsys.readouterr().out
    assert "6 errors" in text and "train.csv row 7: duplicate id 'a0' (first at row 2)" in text
    assert "images/trunc.png (train.csv row 10)" in text.replace(str(data) + "/", "")
    assert json.loads(out.read_text())["error_count"] == 6
    assert not (data / "check_report.json").exists()


def test_class_folder_layout(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "folders", n_per_class=3)
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / "img000.png").write_bytes(b"")
    (root / "lonely").mkdir()
    grey().save(root / "lonely" / "only.png")
    report = check_dataset(root)
    kinds = by_kind(report)
    assert report.layout == "class-folders" and report.rows == 10
    assert [Path(p["file"]).name for p in kinds["non_image_file"]] == ["notes.txt"]
    assert [Path(p["file"]).name for p in kinds["bad_image"]] == ["img000.png"]
    assert [p["reason"].split("'")[1] for p in kinds["small_class"]] == ["lonely"]
    assert report.classes["square"] == 2 and report.exit_code == PROBLEMS_EXIT_CODE


def test_unreadable_table_is_a_reported_problem(tmp_path: Path, capsys) -> None:
    root = tmp_path / "train"
    (root / "images").mkdir(parents=True)
    (root / "train.csv").write_text("name,kind\nx,1\n")
    assert main(["check", str(root)]) == PROBLEMS_EXIT_CODE
    report = json.loads((root / "check_report.json").read_text())
    assert report["problems"][0]["kind"] == "table" and "no id column" in report["problems"][0]["reason"]
    assert main(["check", str(tmp_path / "missing")]) == DataError.exit_code
    assert "no such dataset folder" in capsys.readouterr().err


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--precision", "fp32", "--val-fraction", "0.2", *extra]


def test_train_fail_lists_every_bad_row_and_leaves_no_run_folder(tmp_path: Path, capsys) -> None:
    data = make_messy(tmp_path / "train")
    out = tmp_path / "run"
    assert main(train_args(data, out)) == DataError.exit_code
    captured = capsys.readouterr()
    assert "6 bad rows or images" in captured.err and "--on-bad-image skip" in captured.err
    for row in (7, 8, 9, 10, 11, 12):
        assert f"row {row}" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "warning:" in captured.out and "orphan.png" in captured.out  # the check ran first
    assert not out.exists()


def test_train_skip_quarantines_and_trains_on_the_rest(tmp_path: Path, capsys) -> None:
    data = make_messy(tmp_path / "train")
    out = tmp_path / "run"
    assert main(train_args(data, out, "--on-bad-image", "skip")) == 0
    quarantine = json.loads((out / "quarantine.json").read_text())
    assert sorted(q["row"] for q in quarantine) == [7, 8, 9, 10, 11, 12]
    assert all(q["reason"] for q in quarantine)
    assert json.loads((out / "data.json").read_text())["rows"] == len(MESSY_ROWS) - 6
    assert json.loads((out / "run.json").read_text())["data"]["quarantined"] == 6
    assert "quarantined 6 bad rows" in capsys.readouterr().out


def test_resume_on_changed_data_is_refused(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    data = csv_dataset / "train"
    assert main(train_args(data, out, "--epochs", "2")) == 0
    (out / "run.json").unlink()  # pretend it was interrupted
    csv_file = data / "train.csv"
    csv_file.write_text(csv_file.read_text().replace("tr0003,0", "tr0003,1"))
    capsys.readouterr()
    assert main(train_args(data, out, "--epochs", "2")) == 4
    err = capsys.readouterr().err
    assert "different data" in err and "digest" in err and "--overwrite" in err


def test_run_folder_from_another_config_names_the_difference(csv_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(train_args(csv_dataset / "train", out, "--lr", "0.004", "--augment", "flip")) == 0
    capsys.readouterr()
    assert main(train_args(csv_dataset / "train", out, "--lr", "0.01", "--augment", "none")) == 4
    err = capsys.readouterr().err
    assert "lr: 0.004 -> 0.01" in err and "augment: 'flip' -> 'none'" in err
    assert "seed" not in err  # only what differs


@pytest.mark.parametrize("on_bad", ["fail", "skip"])
def test_load_dataset_never_raises_anything_but_data_error(tmp_path: Path, on_bad: str) -> None:
    from imgcls.data import load_dataset

    data = make_messy(tmp_path / "train")
    if on_bad == "fail":
        with pytest.raises(DataError, match="6 bad rows or images"):
            load_dataset(data, on_bad=on_bad)
    else:
        loaded = load_dataset(data, on_bad=on_bad)
        assert len(loaded.ids) == len(MESSY_ROWS) - 6 and len(loaded.bad) == 6


def test_unexpected_decoder_errors_become_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL plugins parsing hostile bytes can raise struct/zlib/index errors: still one line naming the file."""
    import struct

    from PIL import Image as PILImage

    from imgcls.data.images import open_image

    path = tmp_path / "x.png"
    grey().save(path)

    def broken_plugin(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(PILImage, "open", broken_plugin)
    with pytest.raises(DataError, match=r"x.png: corrupt image \(error: unpack requires"):
        open_image(path)
