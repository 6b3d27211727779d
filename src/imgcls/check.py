"""Scan a dataset without training: every problem a training run would trip over, listed at once."""

from __future__ import annotations

import collections
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from imgcls import fileio
from imgcls.config import TrainConfig
from imgcls.data.cache import describe_bad, describe_row
from imgcls.data.classes import class_key, is_missing_label
from imgcls.data.images import image_channels, open_image
from imgcls.data.table import IMAGE_EXTENSIONS, ImageTable, read_dataset
from imgcls.errors import DataError, ImgclsError
from imgcls.models import get_spec
from imgcls.models.registry import check_input_size

REPORT_FILE = "check_report.json"
# Distinct from 0 (clean) and from the error codes in imgcls.errors (2-5, 7): "it ran, and found problems".
PROBLEMS_EXIT_CODE = 6
# Below 8 px a side the scratch CNNs' pooling leaves nothing; the registry's smallest input is 8.
SMALL_SIDE = 8
# Above 4096 px a side decoding dominates and resizing to a classifier input throws away >99%.
LARGE_SIDE = 4096
# What `imgcls train` refuses (with its default options): `check` reports each as an error.
ERROR_KINDS = {"table", "short_row", "empty_id", "duplicate_id", "empty_label", "missing_image", "bad_image",
               "unsafe_path", "ambiguous_image", "single_class", "too_small"}
# How imgcls.data.images.to_array turns each unusual mode into grey or RGB.
CONVERSIONS = {
    "RGBA": "alpha composited onto white", "LA": "alpha composited onto white",
    "PA": "alpha composited onto white", "P": "palette expanded to RGB (transparency onto white)",
    "CMYK": "converted to RGB", "YCbCr": "converted to RGB", "LAB": "converted to RGB",
    "HSV": "converted to RGB", "1": "1-bit expanded to 8-bit grey",
    "I;16": "16-bit grey scaled to 8-bit", "I;16B": "16-bit grey scaled to 8-bit",
    "I;16L": "16-bit grey scaled to 8-bit", "I": "32-bit grey scaled to 8-bit",
    "F": "float grey clipped to 8-bit",
}


@dataclass
class CheckReport:
    """What `imgcls check` found: counts, image modes and sizes, and every problem with its location."""

    data_dir: str
    layout: str = "unknown"  # "csv" or "class-folders"
    csv: str | None = None
    rows: int = 0
    image_files: int = 0
    classes: dict[str, int] = field(default_factory=dict)  # label -> usable images
    modes: dict[str, int] = field(default_factory=dict)
    conversions: dict[str, str] = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    images_checked: bool = True
    problems: list[dict] = field(default_factory=list)  # severity, kind, file, row, id, reason

    @property
    def errors(self) -> list[dict]:
        return [p for p in self.problems if p["severity"] == "error"]

    @property
    def warnings(self) -> list[dict]:
        return [p for p in self.problems if p["severity"] == "warning"]

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.clean else PROBLEMS_EXIT_CODE

    def to_json(self) -> dict:
        return {**asdict(self), "clean": self.clean, "error_count": len(self.errors),
                "warning_count": len(self.warnings)}

    def summary(self, limit: int = 30) -> str:
        """A few readable lines: what the data is, how it will be decoded, then each problem."""
        lines = [f"dataset {self.data_dir} ({self.layout}" + (f", {Path(self.csv).name}" if self.csv else "") + ")",
                 f"  {self.rows} rows, {self.image_files} image files, {len(self.classes)} classes"]
        if self.classes:
            lines.append("  per class: " + ", ".join(f"{k}: {v}" for k, v in self.classes.items()))
        if self.sizes:
            s = self.sizes
            resized = (f"; {s['resized']} images of other sizes will be resized (smallest "
                       f"{s['min'][0]}x{s['min'][1]}, largest {s['max'][0]}x{s['max'][1]})") if s["resized"] else ""
            lines.append(f"  decoded as {s['decode_as']} {s['most_common'][0]}x{s['most_common'][1]}{resized}")
        if self.modes:
            lines.append("  modes: " + ", ".join(
                f"{m} {n}" + (f" ({self.conversions[m]})" if m in self.conversions else "")
                for m, n in self.modes.items()))
        if not self.images_checked:
            lines.append("  (image files not decoded)")
        lines.append(f"  {len(self.errors)} errors, {len(self.warnings)} warnings" if self.problems else "  clean")
        by_row = lambda p: (p["row"] or 0, p["file"])  # noqa: E731
        ordered = sorted(self.errors, key=by_row) + sorted(self.warnings, key=by_row)
        lines += [f"  {p['severity']:<7} {describe_bad(p)}" for p in ordered[:limit]]
        if len(ordered) > limit:
            lines.append(f"  ... and {len(ordered) - limit} more in {REPORT_FILE}")
        return "\n".join(lines)


def add_problem(report: CheckReport, problem: dict) -> None:
    """Record a problem with its severity: errors stop training, warnings deserve a look."""
    severity = "error" if problem["kind"] in ERROR_KINDS else "warning"
    report.problems.append({"severity": severity, **problem})


def warn(report: CheckReport, kind: str, file: str | Path, reason: str, row: int | None = None,
         image_id: str | None = None, csv_name: str | None = None) -> None:
    add_problem(report, {"kind": kind, "id": image_id, "file": str(file), "row": row,
                         "csv": csv_name, "reason": reason})


def check_dataset(data_dir: str | os.PathLike, *, id_column: str | None = None, label_column: str | None = None,
                  csv_path: str | os.PathLike | None = None, require_labels: bool = True,
                  images: bool = True) -> CheckReport:
    """Check a dataset in either layout; `images=False` skips decoding (table-level checks only)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset folder")
    report = CheckReport(str(data_dir), images_checked=images)
    row_problems: list[dict] = []
    try:
        table = read_dataset(data_dir, csv_path=csv_path, id_column=id_column, label_column=label_column,
                             require_labels=require_labels, problems=row_problems)
    except DataError as exc:
        text = str(exc)
        file, _, reason = text.partition(": ")
        add_problem(report, {"kind": "table", "id": None, "file": file, "row": None, "reason": reason or text})
        return report
    for problem in row_problems:
        add_problem(report, problem)
    report.layout = "class-folders" if table.rows is None else "csv"
    report.csv = str(table.source) if report.layout == "csv" else None
    report.rows = len(table) + len(row_problems)
    check_files(report, table, data_dir)
    usable = check_images(report, table) if images else list(range(len(table)))
    check_labels(report, table, usable)
    check_trainable(report, table)
    return report


def file_identity(path: Path) -> tuple:
    """What makes two paths one file (a symbolic or hard link, `a/../a`): its device and inode. One
    stat, where resolving the path costs one per component (minutes for 60,000 images on a busy
    machine). A missing file is only itself."""
    try:
        st = os.stat(path)
    except OSError:
        return ("missing", str(path))
    return st.st_dev, st.st_ino


def check_files(report: CheckReport, table: ImageTable, data_dir: Path) -> None:
    """Image files no row refers to, non-image files among the classes, rows sharing one file."""
    identities = [file_identity(p) for p in table.paths]
    if report.layout == "csv":
        folder = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
        # In a dedicated images/ folder every stray file is suspect; beside the CSV only images are.
        with os.scandir(folder) as entries:
            files = [folder / e.name for e in entries if e.is_file() and not e.name.startswith(".")
                     and (folder != data_dir or Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)]
        named, used = set(table.paths), set(identities)  # a row's own path needs no stat
        for path in sorted(p for p in files if p not in named and file_identity(p) not in used):
            warn(report, "orphan_image", path, "no CSV row refers to this file (it will not be used)")
    else:
        files = [p for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                 for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
        for path in sorted(p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS):
            warn(report, "non_image_file", path, "not an image extension (it will not be used)")
    report.image_files = sum(1 for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
    first: dict[tuple, int] = {}
    for i, (path, key) in enumerate(zip(table.paths, identities)):
        if key in first:
            j = first[key]
            warn(report, "duplicate_file", path, f"rows for ids {table.ids[j]!r} and {table.ids[i]!r} "
                 "point at the same file", table.row_of(i), table.ids[i], table.source.name)
        first.setdefault(key, i)


def check_images(report: CheckReport, table: ImageTable) -> list[int]:
    """Decode every image with the training decoder; record modes and sizes; return rows that decode."""
    usable, modes, sizes, grey = [], collections.Counter(), collections.Counter(), True
    for i, path in enumerate(table.paths):
        csv_name = table.source.name if table.rows else None
        try:
            image = open_image(path, describe_row(table, i))
        except DataError as exc:
            add_problem(report, {"kind": "bad_image", "id": table.ids[i], "file": str(path),
                                 "row": table.row_of(i), "csv": csv_name, "reason": str(exc).split(": ", 1)[-1]})
            continue
        with image:
            modes[image.mode] += 1
            grey &= image_channels(image) == 1
            size = (image.height, image.width)
        sizes[size] += 1
        usable.append(i)
        if min(size) < SMALL_SIDE:
            warn(report, "small_image", path, f"very small ({size[0]}x{size[1]} pixels)",
                 table.row_of(i), table.ids[i], csv_name)
        elif max(size) > LARGE_SIDE:
            warn(report, "large_image", path, f"very large ({size[0]}x{size[1]} pixels: slow to decode)",
                 table.row_of(i), table.ids[i], csv_name)
    report.modes = dict(modes.most_common())
    report.conversions = {m: CONVERSIONS[m] for m in modes if m in CONVERSIONS}
    if sizes:
        common = sizes.most_common(1)[0][0]
        report.sizes = {"most_common": list(common), "distinct": len(sizes),
                        "min": list(min(sizes, key=lambda s: s[0] * s[1])),
                        "max": list(max(sizes, key=lambda s: s[0] * s[1])),
                        "resized": sum(n for s, n in sizes.items() if s != common),
                        "decode_as": "grey" if grey else "RGB"}
    return usable


def check_labels(report: CheckReport, table: ImageTable, usable: list[int]) -> None:
    """Images per class, labels that differ only by case or spacing, classes too small to split."""
    if table.labels is None:
        return
    classes = [class_key(label) for label in table.labels]  # "1", "01" and "1.0" are one class
    # CSV rows with a missing label were left out when read; a class folder named "NaN" is caught here.
    for label in sorted({label for label in classes if is_missing_label(label)}):
        add_problem(report, {"kind": "empty_label", "id": None, "file": str(table.source / label),
                             "row": None, "reason": f"missing label ({label!r} marks a missing value)"})
    usable = [i for i in usable if not is_missing_label(classes[i])]
    counts = collections.Counter(classes[i] for i in usable)
    report.classes = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    variants: dict[str, list[str]] = collections.defaultdict(list)
    for label in sorted(set(classes)):
        variants[" ".join(label.split()).casefold()].append(label)
    for group in (g for g in variants.values() if len(g) > 1):
        rows = [table.row_of(classes.index(label)) for label in group]
        shown = ", ".join(repr(x) for x in group)
        at = f" (first at rows {', '.join(map(str, rows))})" if rows[0] is not None else ""
        warn(report, "label_variants", table.source, f"labels {shown} differ only by case or spacing{at}: "
             "they will train as separate classes")
    for label, n in sorted(counts.items()):
        if n < 2:
            warn(report, "small_class", table.source, f"class {label!r} has only {n} usable image "
                 "(needs at least 2: one to train, one to validate)")


def check_trainable(report: CheckReport, table: ImageTable) -> None:
    """What stops `imgcls train` beyond single rows: one class only, images too small for the network."""
    if len(report.classes) == 1:
        add_problem(report, {"kind": "single_class", "id": None, "file": str(table.source), "row": None,
                             "reason": f"only one class ({next(iter(report.classes))!r}); a classifier "
                                       "needs at least two"})
    if report.sizes:
        try:
            check_input_size(get_spec(TrainConfig.model), tuple(report.sizes["most_common"]), str(table.source))
        except ImgclsError as exc:
            add_problem(report, {"kind": "too_small", "id": None, "file": str(table.source), "row": None,
                                 "reason": str(exc).split(": ", 1)[-1]})


def write_report(report: CheckReport, path: str | os.PathLike) -> Path:
    """check_report.json, written atomically."""
    fileio.write_json(path, report.to_json())
    return Path(path)


def preflight_warnings(data_dir: str | os.PathLike, id_column: str | None = None,
                       label_column: str | None = None, limit: int = 10,
                       csv_path: str | os.PathLike | None = None) -> list[str]:
    """The table-level warnings `imgcls train` prints first; errors are listed by the data loader."""
    report = check_dataset(data_dir, id_column=id_column, label_column=label_column, csv_path=csv_path,
                           images=False)
    lines = [describe_bad(p) for p in report.warnings]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more (`imgcls check {data_dir}` lists them all)"]
    return lines
