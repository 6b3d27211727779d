"""Prediction through the Python API on a list of image paths vs the `imgcls predict` command on the
same images (a test folder with its CSV, read from the decode cache): throughput and equal labels.

    .venv/bin/python benchmarks/api_predict.py RUN TEST_DIR [--limit 10000]

The command is timed as a user runs it (a new process: start-up, model load, cached images,
forward passes, CSV); the API from `imgcls.load` on (the notebook's import already paid for),
decoding every PNG from its path.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imgcls
from imgcls.data.table import read_dataset


def cli_predict(run: Path, test_dir: Path, out: Path) -> tuple[float, dict[str, str]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgcls", "predict", str(run), str(test_dir), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    seconds = time.perf_counter() - start
    with out.open(newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    return seconds, {image_id: label for image_id, label in rows}


def api_predict(run: Path, paths: list[Path]) -> tuple[float, list]:
    start = time.perf_counter()
    model = imgcls.load(run)
    labels = model.predict(paths)
    return time.perf_counter() - start, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("test_dir")
    parser.add_argument("--limit", type=int, default=10_000, help="images to predict (the CSV's first N)")
    args = parser.parse_args()
    run, test_dir = Path(args.run), Path(args.test_dir)
    table = read_dataset(test_dir, require_labels=False)
    ids, paths = table.ids[:args.limit], [Path(p) for p in table.paths[:args.limit]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = test_dir
        if len(ids) < len(table.ids):  # the command predicts a whole folder: give it one of these images
            folder = Path(tmp) / "test"
            (folder / "images").mkdir(parents=True)
            for p in paths:
                os.symlink(p.resolve(), folder / "images" / p.name)
            (folder / "test.csv").write_text("id\n" + "".join(f"{i}\n" for i in ids))
        os.environ["IMGCLS_ALLOW_SYMLINKS"] = "1"
        cli_predict(run, folder, Path(tmp) / "warm.csv")  # builds the decode cache once, as a user's first run would
        cli_s, cli_labels = cli_predict(run, folder, Path(tmp) / "submission.csv")
    api_s, api_labels = api_predict(run, paths)
    same = all(str(label) == cli_labels[i] for i, label in zip(ids, api_labels))
    n = len(ids)
    print("| what | images | seconds | images/s |")
    print("|---|---|---|---|")
    print(f"| `imgcls predict RUN TEST_DIR` (new process, cached images) | {n} | {cli_s:.2f} | {n / cli_s:,.0f} |")
    print(f"| `imgcls.load(RUN).predict(paths)` (decodes every file) | {n} | {api_s:.2f} | {n / api_s:,.0f} |")
    print(f"API / command throughput: {cli_s / api_s:.2f}x; same labels: {same}")


if __name__ == "__main__":
    main()
