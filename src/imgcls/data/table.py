"""Read a labelled image collection into an ImageTable: CSV + image folder, or class subfolders."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from imgcls.data.classes import is_missing_label
from imgcls.errors import DataError, where

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ID_COLUMNS = ("id", "image_id", "image", "filename", "file", "file_name", "img", "path")
LABEL_COLUMNS = ("label", "class", "target", "category", "labels", "y")


@dataclass
class ImageTable:
    """Rows of a dataset: ids as written, resolved image paths, raw labels (None when unlabelled)."""

    source: Path  # the CSV, or the folder for the class-folder layout
    ids: list[str]
    paths: list[Path]
    labels: list[str] | None
    id_column: str = "id"
    label_column: str = "label"
    rows: list[int] | None = None  # CSV line number of each row, for error messages

    def __len__(self) -> int:
        return len(self.ids)

    def row_of(self, i: int) -> int | None:
        return self.rows[i] if self.rows else None

    def subset(self, keep: list[int]) -> "ImageTable":
        """The same table restricted to the given row positions."""
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return ImageTable(self.source, pick(self.ids), pick(self.paths), pick(self.labels),
                          self.id_column, self.label_column, pick(self.rows))


def flag(problems: list[dict] | None, kind: str, file: Path, row: int | None, image_id: str | None,
         reason: str, column: str | None = None) -> None:
    """Raise a one-line DataError, or record the problem and carry on when a checker collects them."""
    if problems is None:
        raise DataError(f"{where(file, row, column)}: {reason}")
    problems.append({"kind": kind, "id": image_id, "file": str(file), "row": row, "reason": reason})


def find_csv(data_dir: Path) -> Path | None:
    """The dataset's CSV: `<dir>/<dir name>.csv` (train/train.csv), else the only CSV there."""
    named = data_dir / f"{data_dir.name}.csv"
    if named.is_file():
        return named
    csvs = sorted(p for p in data_dir.glob("*.csv") if p.is_file())
    if len(csvs) > 1:
        raise DataError(f"{data_dir}: several CSV files ({', '.join(p.name for p in csvs)}); "
                        f"name the one to use with --csv")
    return csvs[0] if csvs else None


def read_dataset(data_dir: str | os.PathLike, *, csv_path: str | os.PathLike | None = None,
                 id_column: str | None = None, label_column: str | None = None,
                 require_labels: bool = True, problems: list[dict] | None = None) -> ImageTable:
    """Read a dataset folder in either layout; errors name the file and row.

    With `problems`, bad rows (duplicate id, missing image, empty cell) are recorded there and
    left out instead of stopping at the first; file-level errors always raise.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such dataset folder")
    csv_file = Path(csv_path) if csv_path else find_csv(data_dir)
    if csv_file is None and (data_dir / "images").is_dir():
        raise DataError(f"{data_dir}: has images/ but no CSV file; expected {data_dir.name}.csv "
                        f"with id and label columns")
    if csv_file is None:
        table = read_class_folders(data_dir, problems)
        if table is None:
            raise DataError(f"{data_dir}: no CSV file and no class subfolders with images; expected "
                            f"{data_dir.name}.csv + images/ or one subfolder per class")
        return table
    images_dir = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    return read_csv_table(csv_file, images_dir, id_column=id_column, label_column=label_column,
                          require_labels=require_labels, problems=problems)


def _decode_csv(csv_file: Path) -> str:
    if not csv_file.is_file():
        raise DataError(f"{csv_file}: CSV file not found")
    try:
        raw = csv_file.read_bytes()
    except OSError as exc:
        raise DataError(f"{csv_file}: cannot read ({exc.strerror})") from None
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DataError(f"{csv_file}: cannot decode as text")  # pragma: no cover - latin-1 never fails


def pick_column(header: list[str], wanted: str | None, candidates: tuple[str, ...],
                what: str, csv_file: Path) -> str:
    """Choose a column by explicit name or by common names; fail listing what exists."""
    lowered = {h.strip().lower(): h for h in header}
    if wanted is not None:
        if wanted in header:
            return wanted
        if wanted.lower() in lowered:
            return lowered[wanted.lower()]
        raise DataError(f"{csv_file}: no column {wanted!r}; columns are {header}")
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{csv_file}: no {what} column (looked for {', '.join(candidates)}); "
                    f"columns are {header}; name it with --{what}-column")


def read_csv_table(csv_file: Path, images_dir: Path, *, id_column: str | None = None,
                   label_column: str | None = None, require_labels: bool = True,
                   problems: list[dict] | None = None) -> ImageTable:
    """Parse the CSV, resolve every id to an image file, and check ids are unique."""
    text = _decode_csv(csv_file)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{csv_file}: empty CSV (no header row)") from None
    except csv.Error as exc:
        raise DataError(f"{csv_file} row 1: malformed CSV ({exc})") from None
    header = [h.strip() for h in header]
    id_col = pick_column(header, id_column, ID_COLUMNS, "id", csv_file)
    label_col = None
    if require_labels or label_column:
        label_col = pick_column(header, label_column, LABEL_COLUMNS, "label", csv_file)
    elif any(h.lower() in LABEL_COLUMNS for h in header):
        label_col = pick_column(header, None, LABEL_COLUMNS, "label", csv_file)
    id_idx = header.index(id_col)
    label_idx = header.index(label_col) if label_col else None

    ids, labels, rows = [], [], []
    seen: dict[str, int] = {}
    try:
        for record in reader:
            row = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue  # blank line
            parsed = _parse_row(record, row, header, id_idx, label_idx, id_col, label_col,
                                seen, csv_file, problems)
            if parsed is None:
                continue
            seen[parsed[0]] = row
            ids.append(parsed[0])
            rows.append(row)
            if label_idx is not None:
                labels.append(parsed[1])
    except csv.Error as exc:
        raise DataError(f"{where(csv_file, reader.line_num)}: malformed CSV ({exc})") from None
    if not ids and not problems:
        raise DataError(f"{csv_file}: empty CSV (header but no rows)")
    paths = resolve_image_paths(csv_file, images_dir, ids, rows, problems)
    table = ImageTable(csv_file, ids, paths, labels if label_idx is not None else None,
                       id_col, label_col or "label", rows)
    found = [i for i, path in enumerate(paths) if path is not None]
    return table if len(found) == len(paths) else table.subset(found)


def _parse_row(record: list[str], row: int, header: list[str], id_idx: int, label_idx: int | None,
               id_col: str, label_col: str | None, seen: dict[str, int], csv_file: Path,
               problems: list[dict] | None) -> tuple[str, str | None] | None:
    """(id, label) of one CSV record, or None after flagging why the row is unusable."""
    if len(record) <= max(id_idx, label_idx or 0):
        flag(problems, "short_row", csv_file, row, None,
             f"expected {len(header)} fields, got {len(record)}")
        return None
    image_id = record[id_idx].strip()
    if not image_id:
        flag(problems, "empty_id", csv_file, row, None, "empty id", id_col)
        return None
    if image_id in seen:
        flag(problems, "duplicate_id", csv_file, row, image_id,
             f"duplicate id {image_id!r} (first at row {seen[image_id]})")
        return None
    label = record[label_idx].strip() if label_idx is not None else None
    if label is not None and is_missing_label(label):
        reason = f"missing label ({label!r} marks a missing value)" if label else "empty label"
        flag(problems, "empty_label", csv_file, row, image_id, reason, label_col)
        return None
    return image_id, label


# Opt-in for datasets whose images are symbolic links into another folder (a shared image store):
# without it a link that leaves the dataset folder is refused, like an id with "..".
ALLOW_SYMLINKS_ENV = "IMGCLS_ALLOW_SYMLINKS"


def symlinks_allowed() -> bool:
    return os.environ.get(ALLOW_SYMLINKS_ENV, "") not in ("", "0")


def unsafe_id_reason(image_id: str) -> str | None:
    """Why an id may not name a file (absolute, '..', NUL), or None when it is a plain relative name."""
    if "\x00" in image_id:
        return "contains a NUL character"
    drive = len(image_id) > 2 and image_id[0].isalpha() and image_id[1] == ":" and image_id[2] in "/\\"
    if image_id.startswith(("/", "\\")) or drive:
        return "is an absolute path"
    if ".." in image_id.replace("\\", "/").split("/"):
        return "contains '..'"
    return None


def inside(path: Path, root: Path) -> bool:
    """True when `path` (already resolved) is `root` or lies under it."""
    return path == root or root in path.parents


def outside_reason(path: Path, root: Path) -> str | None:
    """Why `path` may not be read: a symbolic link (or a link above it) that leaves the dataset folder."""
    if symlinks_allowed():
        return None
    target = path.resolve()
    if inside(target, root):
        return None
    return (f"{path} is a symbolic link to {target}, outside the dataset folder {root}; refused "
            f"(set {ALLOW_SYMLINKS_ENV}=1 to follow links)")


class FileIndex:
    """The image folder's file names, for id lookups: exact names first, then case-insensitive."""

    def __init__(self, folder: Path, root: Path):
        self.folder, self.root = folder, root
        self.by_lower: dict[str, list[str]] = {}
        self.links: set[str] = set()  # entries that are symbolic links (checked when used)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    self.by_lower.setdefault(entry.name.lower(), []).append(entry.name)
                    if entry.is_symlink():
                        self.links.add(entry.name)
        for names in self.by_lower.values():
            names.sort()

    def candidates(self, image_id: str) -> list[str]:
        """Lower-cased names the id may denote, in order of preference."""
        key = image_id.lower()
        keys = [key] if key.endswith(IMAGE_EXTENSIONS) else []
        return keys + [key + ext for ext in IMAGE_EXTENSIONS] + [key]

    def match(self, image_id: str) -> tuple[str | None, str | None]:
        """(file name, None) or (None, why not): an exact name wins; several case variants are ambiguous."""
        keys = self.candidates(image_id)
        for exact in (True, False):
            for key in keys:
                names = self.by_lower.get(key, [])
                if exact:
                    names = [n for n in names if n[:len(image_id)] == image_id]
                if len(names) > 1:
                    return None, (f"id {image_id!r} matches several files that differ only by case "
                                  f"({', '.join(names)}); rename them or write the exact file name")
                if names:
                    return names[0], None
        return None, None


def resolve_image_paths(csv_file: Path, images_dir: Path, ids: list[str], rows: list[int],
                        problems: list[dict] | None = None) -> list[Path | None]:
    """Map ids (with or without extension, any case) to files inside the dataset folder; one
    directory scan, not 60k stats.

    Ids that are absolute or contain '..', and symbolic links that leave the dataset folder, are
    refused; an exact file name wins over a case-insensitive match, and an id that matches several
    case variants is refused as ambiguous. With `problems`, each refused id is recorded there and
    its path is None.
    """
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found (for {csv_file})")
    root = csv_file.parent.resolve()
    images_reason = outside_reason(images_dir, root)
    index = FileIndex(images_dir, root)
    paths = []
    for image_id, row in zip(ids, rows):
        path, kind, reason = _resolve_one(image_id, index, images_reason)
        if reason is not None:
            flag(problems, kind, csv_file, row, image_id, reason)
        paths.append(path)
    return paths


def _resolve_one(image_id: str, index: FileIndex, folder_reason: str | None
                 ) -> tuple[Path | None, str, str | None]:
    """(path, problem kind, reason): the path is None exactly when a reason says why."""
    unsafe = unsafe_id_reason(image_id)
    if unsafe is not None:
        return None, "unsafe_path", f"id {image_id!r} {unsafe}: image ids must name files inside {index.folder}"
    name, ambiguous = index.match(image_id)
    if ambiguous is not None:
        return None, "ambiguous_image", ambiguous
    if name is None and ("/" in image_id or os.sep in image_id):
        candidate = index.folder / image_id
        name = image_id if candidate.is_file() else None
    if name is None:
        return None, "missing_image", (f"no image file for id {image_id!r} in {index.folder} "
                                       f"(tried the name as given and with {', '.join(IMAGE_EXTENSIONS[:5])})")
    path = index.folder / name
    if folder_reason is not None:
        return None, "unsafe_path", folder_reason
    if name in index.links or "/" in name or os.sep in name:
        reason = outside_reason(path, index.root)
        if reason is not None:
            return None, "unsafe_path", reason
    return path, "", None


def read_class_folders(data_dir: Path, problems: list[dict] | None = None) -> ImageTable | None:
    """The `<dir>/<class>/<image>` layout; None when the folder does not look like it. Class folders
    and images that are symbolic links out of `data_dir` are refused (recorded in `problems`)."""
    root = data_dir.resolve()
    class_dirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    ids, paths, labels = [], [], []
    for class_dir in class_dirs:
        folder_reason = outside_reason(class_dir, root) if class_dir.is_symlink() else None
        for image in sorted(class_dir.iterdir()):
            if not (image.is_file() and image.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            image_id = f"{class_dir.name}/{image.name}"
            reason = folder_reason or (outside_reason(image, root) if image.is_symlink() else None)
            if reason is not None:
                flag(problems, "unsafe_path", image, None, image_id, reason)
                continue
            ids.append(image_id)
            paths.append(image)
            labels.append(class_dir.name)
    if not ids:
        return None
    return ImageTable(data_dir, ids, paths, labels, "id", "label", None)


def read_answer_key(key_file: str | os.PathLike, *, id_column: str | None = None,
                    label_column: str | None = None) -> dict[str, tuple[str, int]]:
    """An answer key CSV (id,label) as {id: (label, row)}."""
    key_file = Path(key_file)
    text = _decode_csv(key_file)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{key_file}: empty CSV (no header row)")
    header = [h.strip() for h in header]
    id_idx = header.index(pick_column(header, id_column, ID_COLUMNS, "id", key_file))
    label_idx = header.index(pick_column(header, label_column, LABEL_COLUMNS, "label", key_file))
    key: dict[str, tuple[str, int]] = {}
    for record in reader:
        if not record or all(not c.strip() for c in record):
            continue
        row = reader.line_num
        if len(record) <= max(id_idx, label_idx):
            raise DataError(f"{where(key_file, row)}: expected {len(header)} fields, got {len(record)}")
        image_id = record[id_idx].strip()
        if image_id in key:
            raise DataError(f"{where(key_file, row)}: duplicate id {image_id!r}")
        key[image_id] = (record[label_idx].strip(), row)
    if not key:
        raise DataError(f"{key_file}: empty CSV (header but no rows)")
    return key
