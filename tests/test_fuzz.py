"""Property-based tests: generated CSVs and mutated image bytes either load correctly or fail as a
DataError naming the file and row; nothing else ever escapes, and no partial run folder is left."""

from __future__ import annotations

import collections
import csv
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls.check import check_dataset
from imgcls.data import load_dataset
from imgcls.data.classes import is_missing_label
from imgcls.errors import DataError

# IMGCLS_FUZZ_SCALE=10 runs a longer campaign; the default keeps the file near a minute on 2 cores.
SCALE = int(os.environ.get("IMGCLS_FUZZ_SCALE", "1"))
CSV_EXAMPLES = 250 * SCALE
IMAGE_EXAMPLES = 250 * SCALE
FIT_EXAMPLES = 2 * SCALE  # per kind of breakage
def fuzz(examples: int) -> settings:
    """No deadline (2 shared cores), no example database written into the repository."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

FOUND: collections.Counter = collections.Counter()  # outcome -> cases, printed at the end for the record
IDS = [f"img{i}" for i in range(12)]


@pytest.fixture(scope="module", autouse=True)
def record_findings(request: pytest.FixtureRequest):
    yield
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"fuzz: {sum(v for k, v in FOUND.items() if k.startswith(group))} {group} cases"
             for group in ("csv", "image", "fit")]
    lines += [f"  {n:5d}  {outcome}" for outcome, n in sorted(FOUND.items())]
    if os.environ.get("IMGCLS_FUZZ_REPORT"):
        Path(os.environ["IMGCLS_FUZZ_REPORT"]).write_text("\n".join(lines) + "\n")
    for line in lines:
        terminal.write_line(line) if terminal else print(line)


def outcome_of(exc: DataError) -> str:
    """The kind of error with the specifics (paths, ids, numbers) stripped, for counting."""
    lines = str(exc).splitlines()
    text = lines[1] if len(lines) > 1 else lines[0]  # a list: count its first entry
    text = re.sub(r"^\s*\S+( \(\S+ row \d+\))?( row \d+)?( column '[^']*')?: ", "", text)
    text = re.sub(r"'[^']*'|\d+|\(.*| in /\S+", "", text)
    return text.strip()[:60]


def new_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


def grey_png(path: Path, seed: int, size: int = 8) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(path)


# ---------------------------------------------------------------- CSVs
TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ 019-_.,;\"'éüß猫\t")), max_size=8)
LABEL = st.one_of(st.integers(-3, 12).map(str), st.floats(-2, 3, allow_nan=False).map(lambda f: f"{f:.1f}"),
                  TEXT, st.sampled_from(["cat", "Cat", " dog ", "", "1", "01"]))
ROW = st.fixed_dictionaries({
    # Mostly plain ids, sometimes with extension or in upper case, rarely missing or empty.
    "id": st.sampled_from(IDS * 4 + [i + ".png" for i in IDS] + [i.upper() for i in IDS] + ["missing", "", "  "]),
    "label": st.one_of(LABEL, st.sampled_from(["cat", "dog", "3"])), "extra": TEXT, "short": st.integers(0, 20).map(lambda n: n == 0),
    "blank_before": st.integers(0, 8).map(lambda n: n == 0)})
CSV_CASE = st.fixed_dictionaries({
    "rows": st.lists(ROW, max_size=7),
    "id_name": st.sampled_from(["id", "image_id", " ID ", "filename", "name"]),
    "label_name": st.sampled_from(["label", "class", "Label ", "target"]),
    "extra_first": st.booleans(), "extra_last": st.booleans(),
    "encoding": st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "latin-1", "utf-16"]),
    "newline": st.sampled_from(["\n", "\r\n", "\r"]),
    "quoting": st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
})


def render_csv(case: dict) -> tuple[str, dict[int, dict]]:
    """CSV text and {line number: row} for the data rows (blank lines count, as a reader sees them)."""
    header = [case["id_name"], case["label_name"]]
    header = (["notes"] if case["extra_first"] else []) + header + (["width"] if case["extra_last"] else [])
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=case["quoting"], lineterminator=case["newline"])
    writer.writerow(header)
    line, at = 1, {}
    for row in case["rows"]:
        if row["blank_before"]:
            buf.write(case["newline"])
            line += 1
        cells = ([row["extra"]] if case["extra_first"] else []) + [row["id"], row["label"]]
        cells += [row["extra"]] if case["extra_last"] else []
        if row["short"]:
            cells = cells[: (1 if case["extra_first"] else 0) + 1]
        writer.writerow(cells)
        line += 1
        at[line] = {**row, "cells": cells}
    return buf.getvalue(), at


def expected_problems(case: dict, at: dict[int, dict]) -> tuple[list[int], list[tuple[str, str]]]:
    """Rows the reader must reject, and the (id, label) pairs it must return for the rest."""
    bad, good, seen = [], [], set()
    for line, row in at.items():
        if all(not cell.strip() for cell in row["cells"]):
            continue  # reads as a blank line
        image_id, label = row["id"].strip(), row["label"].strip()
        if row["short"] or not image_id or image_id in seen or is_missing_label(label) or image_id == "missing":
            bad.append(line)
            continue
        seen.add(image_id)
        good.append((image_id, label))
    return bad, good


@fuzz(CSV_EXAMPLES)
@given(case=CSV_CASE)
def test_generated_csvs_load_or_name_file_and_row(case: dict) -> None:
    root = new_dir()
    try:
        (root / "images").mkdir()
        for seed, image_id in enumerate(IDS):
            grey_png(root / "images" / f"{image_id}.png", seed)
        text, at = render_csv(case)
        try:
            raw = text.encode(case["encoding"])
        except UnicodeEncodeError:
            FOUND["note: csv text not encodable, written as utf-8"] += 1
            raw, case = text.encode("utf-8"), {**case, "encoding": "utf-8"}
        (root / "data.csv").write_bytes(raw)
        check_csv_case(root, case, at)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_csv_case(root: Path, case: dict, at: dict[int, dict]) -> None:
    bad, good = expected_problems(case, at)
    try:
        data = load_dataset(root, use_cache=False)
    except DataError as exc:
        FOUND[f"csv: DataError: {outcome_of(exc)}"] += 1
        message = str(exc)
        assert "data.csv" in message, message
        if case["encoding"] != "utf-16" and case["id_name"] != "name" and at:
            for line in bad:  # every rejected row is named, not just the first
                assert f"row {line}" in message, (line, message)
        return
    FOUND["csv: loaded"] += 1
    assert case["encoding"] != "utf-16" and case["id_name"] != "name" and not bad and good
    assert list(zip(data.ids, data.table.labels)) == good
    assert len(data.images) == len(good) and data.targets is not None


# ---------------------------------------------------------------- image bytes
BASES = ("png-grey", "png-rgb", "jpeg", "gif", "bmp", "webp")


def base_bytes(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0]) if kind == "png-grey" else Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format={"png-grey": "PNG", "png-rgb": "PNG"}.get(kind, kind.upper()))
    return buf.getvalue()


MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bitflip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=6)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
    st.tuples(st.just("intact"), st.none()),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "bitflip":
        out = bytearray(data)
        for where, bit in arg:
            out[min(int(where * len(out)), len(out) - 1)] ^= 1 << bit
        return bytes(out)
    if kind == "garbage":
        return arg
    return data


@fuzz(IMAGE_EXAMPLES)
@given(base=st.sampled_from(BASES), mutation=MUTATION,
       extension=st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".txt"]), seed=st.integers(0, 3))
def test_mutated_images_load_or_name_file_and_row(base: str, mutation: tuple, extension: str, seed: int) -> None:
    root = new_dir()
    try:
        (root / "images").mkdir()
        for i in range(3):
            grey_png(root / "images" / f"ok{i}.png", i, 12)
        target = root / "images" / f"fuzzed{extension}"
        target.write_bytes(mutate(base_bytes(base, seed), mutation))
        (root / "data.csv").write_text("id,label\nok0,a\nok1,b\nok2,a\nfuzzed" + extension + ",b\n")
        check_image_case(root, mutation[0])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_image_case(root: Path, mutation: str) -> None:
    try:
        data = load_dataset(root, use_cache=False)
        failed = None
    except DataError as exc:
        failed = str(exc)
        FOUND[f"image ({mutation}): DataError: {outcome_of(exc)}"] += 1
        assert "fuzzed" in failed and "data.csv row 5" in failed, failed
    if failed is None:
        FOUND[f"image ({mutation}): decoded"] += 1
        assert tuple(data.images.shape[:3]) == (4, 12, 12) and data.images.shape[3] in (1, 3)
        assert data.ids[-1].startswith("fuzzed")
    # The checker decodes with the same code: it flags the image exactly when loading failed.
    flagged = [p for p in check_dataset(root).problems if p["kind"] == "bad_image"]
    assert bool(flagged) == (failed is not None), (flagged, failed)
    skipped = load_dataset(root, on_bad="skip", use_cache=False)
    assert len(skipped.ids) == (3 if failed else 4)


# ---------------------------------------------------------------- training never leaves a partial run
BREAKS = ("none", "duplicate", "missing", "corrupt", "no_rows", "bad_header")


@pytest.mark.parametrize("brk", BREAKS)
@fuzz(FIT_EXAMPLES)
@given(junk=st.binary(min_size=1, max_size=32))
def test_training_on_fuzzed_data_leaves_a_complete_run_or_none(brk: str, junk: bytes) -> None:
    from imgcls.config import TrainConfig
    from imgcls.train.runner import fit

    root = new_dir()
    try:
        data = root / "train"
        (data / "images").mkdir(parents=True)
        rows = [f"img{i},{'ab'[i % 2]}" for i in range(8)]
        for i in range(8):
            grey_png(data / "images" / f"img{i}.png", i)
        if brk == "duplicate":
            rows.append("img3,b")
        elif brk == "missing":
            rows.append("ghost,a")
        elif brk == "corrupt":
            (data / "images" / "img5.png").write_bytes(junk)
        header = "id,label"
        if brk == "no_rows":
            rows = []
        elif brk == "bad_header":
            header = "picture;kind"
        (data / "train.csv").write_text("\n".join([header] + rows) + "\n")
        out = root / "run"
        config = TrainConfig(data_dir=str(data), epochs=1, batch_size=4, precision="fp32", val_fraction=0.25)
        try:
            fit(config, out, device="cpu", log=lambda _: None)
        except DataError as exc:
            FOUND[f"fit ({brk}): DataError: {outcome_of(exc)}"] += 1
            assert not out.exists(), sorted(p.name for p in out.iterdir())
            return
        FOUND[f"fit ({brk}): trained"] += 1
        assert brk == "none" or (brk == "corrupt" and _decodes(data / "images" / "img5.png"))
        assert (out / "run.json").exists() and (out / "model.safetensors").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - only asks whether PIL could read it at all
        return False
