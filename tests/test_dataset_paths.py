"""Image ids resolve only to files inside the dataset folder; an exact file name beats a case-insensitive one."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls.check import check_dataset, write_report
from imgcls.cli import main
from imgcls.data import load_dataset
from imgcls.data.table import ALLOW_SYMLINKS_ENV, resolve_image_paths
from imgcls.errors import DataError

from conftest import make_csv_dataset, make_folder_dataset


def glyph(value: int) -> Image.Image:
    """A 16x16 grey image filled with `value`: which file was decoded is visible in the pixels."""
    return Image.fromarray(np.full((16, 16), value, dtype=np.uint8), mode="L")


def rewrite_ids(csv_file: Path, ids: dict[int, str]) -> None:
    """Replace the id of data rows (0-based) with the given strings."""
    rows = list(csv.reader(csv_file.open(newline="")))
    for i, image_id in ids.items():
        rows[i + 1][0] = image_id
    with csv_file.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.fixture
def escaping_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A dataset whose rows 2 and 3 (CSV lines 3 and 4) name a real, decodable image outside it."""
    root = make_csv_dataset(tmp_path / "ds")
    secret = tmp_path / "secret"
    secret.mkdir()
    glyph(77).save(secret / "x.png")
    rewrite_ids(root / "train" / "train.csv", {1: "../../secret/x.png", 2: str(secret / "x.png")})
    return root, secret


def test_ids_with_dotdot_or_absolute_paths_are_refused_with_file_and_row(escaping_dataset, capsys) -> None:
    root, _ = escaping_dataset
    with pytest.raises(DataError) as err:
        load_dataset(root / "train")
    text = str(err.value)
    assert "train.csv row 3: id '../../secret/x.png' contains '..'" in text
    assert "train.csv row 4:" in text and "is an absolute path" in text
    code = main(["train", str(root / "train"), "--out", str(root / "run"), "--epochs", "1"])
    assert code == DataError.exit_code
    assert "train.csv row 3" in capsys.readouterr().err
    assert not (root / "run").exists()


def test_skip_quarantines_escaping_rows_without_reading_them(escaping_dataset) -> None:
    root, _ = escaping_dataset
    data = load_dataset(root / "train", on_bad="skip")
    assert {b["row"] for b in data.bad} == {3, 4}
    assert {b["kind"] for b in data.bad} == {"unsafe_path"}
    assert len(data.ids) == 34 and not (data.images == 77).all(dim=(1, 2, 3)).any()


def test_check_reports_escaping_ids_and_still_writes_its_report(escaping_dataset) -> None:
    root, _ = escaping_dataset
    report = check_dataset(root / "train")
    unsafe = [p for p in report.problems if p["kind"] == "unsafe_path"]
    assert [p["row"] for p in unsafe] == [3, 4] and {p["severity"] for p in unsafe} == {"error"}
    assert not report.clean
    assert write_report(report, root / "report.json").is_file()


def test_prediction_refuses_an_escaping_test_id(tmp_path: Path) -> None:
    root = make_csv_dataset(tmp_path / "ds")
    glyph(9).save(tmp_path / "elsewhere.png")
    rewrite_ids(root / "test" / "test.csv", {0: "../../elsewhere.png"})
    with pytest.raises(DataError, match=r"test.csv row 2: id '\.\./\.\./elsewhere.png' contains '\.\.'"):
        load_dataset(root / "test", require_labels=False)


def test_symlinks_out_of_the_dataset_are_refused_unless_allowed(tmp_path: Path, monkeypatch) -> None:
    root = make_csv_dataset(tmp_path / "ds")
    outside = tmp_path / "store"
    outside.mkdir()
    images = root / "train" / "images"
    glyph(99).save(outside / "tr0000.png")
    (images / "tr0000.png").unlink()
    (images / "tr0000.png").symlink_to(outside / "tr0000.png")
    shutil.copy(images / "tr0003.png", root / "train" / "kept.png")
    (images / "tr0003.png").unlink()
    (images / "tr0003.png").symlink_to(root / "train" / "kept.png")  # a link that stays inside is fine
    with pytest.raises(DataError, match=r"train.csv row 2: .*tr0000.png is a symbolic link to .*store"):
        load_dataset(root / "train")
    monkeypatch.setenv(ALLOW_SYMLINKS_ENV, "1")
    data = load_dataset(root / "train")
    assert len(data.ids) == 36 and int(data.images[0].float().mean()) == 99


def test_a_symlinked_image_folder_out_of_the_dataset_is_refused(tmp_path: Path) -> None:
    root = make_csv_dataset(tmp_path / "ds")
    shutil.move(root / "train" / "images", tmp_path / "shared_images")
    (root / "train" / "images").symlink_to(tmp_path / "shared_images")
    report = check_dataset(root / "train")
    assert {p["kind"] for p in report.errors} == {"unsafe_path"} and len(report.errors) == 36


def test_class_folders_that_link_out_of_the_dataset_are_refused(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "folders")
    shutil.move(root / "bar", tmp_path / "bar_elsewhere")
    (root / "bar").symlink_to(tmp_path / "bar_elsewhere")
    with pytest.raises(DataError, match="bar.*is a symbolic link to .*bar_elsewhere"):
        load_dataset(root)
    data = load_dataset(root, on_bad="skip")
    assert set(data.table.labels) == {"circle", "square"} and len(data.bad) == 8


@pytest.fixture
def case_variants(tmp_path: Path) -> Path:
    """tr0000 exists as Ab.png and ab.png, with different pixels."""
    root = make_csv_dataset(tmp_path / "ds")
    images = root / "train" / "images"
    glyph(10).save(images / "Ab.png")
    glyph(200).save(images / "ab.png")
    return root


@pytest.mark.parametrize("image_id, value", [("ab", 200), ("Ab", 10), ("ab.png", 200), ("Ab.png", 10)])
def test_an_exact_file_name_wins_over_its_case_variant(case_variants: Path, image_id: str, value: int) -> None:
    rewrite_ids(case_variants / "train" / "train.csv", {0: image_id})
    data = load_dataset(case_variants / "train")
    assert int(data.images[0].float().mean()) == value


def test_an_id_matching_only_case_variants_is_ambiguous(case_variants: Path) -> None:
    rewrite_ids(case_variants / "train" / "train.csv", {0: "AB"})
    with pytest.raises(DataError, match=r"train.csv row 2: id 'AB' matches several files .*\(Ab.png, ab.png\)"):
        load_dataset(case_variants / "train")
    kinds = {p["kind"]: p for p in check_dataset(case_variants / "train").errors}
    assert kinds["ambiguous_image"]["row"] == 2


# --- property: whatever the id, the path it resolves to lies inside the dataset folder ----------------

FILES = ["a.png", "Ab.png", "ab.png", "b.PNG", "c.jpg", "C.JPG", "d", "x.png"]
FRAGMENTS = ["..", ".", "/", "\\", "a", "A", "b", "B", "c", "C", "d", "x", ".png", ".PNG", ".jpg", "sub",
             "secret", "out", "in", "~", ":", "C:", " ", "\x00", "images", "ds", "link", "inlink"]


@pytest.fixture(scope="module")
def lookup_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ds/train/images with case variants, a subfolder, links that stay inside and links that leave."""
    base = tmp_path_factory.mktemp("lookup")
    (base / "secret").mkdir()
    (base / "secret" / "x.png").write_bytes(b"outside")
    images = base / "ds" / "train" / "images"
    (images / "sub").mkdir(parents=True)
    for name in FILES:
        (images / name).write_bytes(name.encode())
    (images / "sub" / "a.png").write_bytes(b"sub")
    (images / "out.png").symlink_to(base / "secret" / "x.png")
    (images / "outdir").symlink_to(base / "secret")
    (images / "in.png").symlink_to(images / "a.png")
    (base / "ds" / "train" / "train.csv").write_text("id,label\n")
    return images


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6).map("".join))
def test_no_id_resolves_outside_the_dataset_and_exact_names_win(lookup_folder: Path, image_id: str) -> None:
    root = lookup_folder.parent.resolve()
    problems: list[dict] = []
    [path] = resolve_image_paths(root / "train.csv", lookup_folder, [image_id], [2], problems)
    if path is None:
        assert len(problems) == 1 and problems[0]["row"] == 2
        return
    assert not problems
    resolved = path.resolve()
    assert resolved == root or root in resolved.parents
    exact = [image_id] if (lookup_folder / image_id).is_file() and image_id in FILES else []
    exact += [image_id + ext for ext in (".png", ".PNG", ".jpg", ".JPG") if image_id + ext in FILES]
    if exact:
        assert path.name in exact
