"""Fashion-MNIST decode cache, this tree vs another (e.g. main): build (train + test), cached re-read
and the scratch CNN's epoch time.

The contest layout is written once; each tree then builds its cache from scratch (the cache folder
is removed first) and reads it back, then trains one scratch-cnn epoch (fp32) on --epoch-per-class
images per class, alternating trees so a busy machine hits both alike.

Usage: python benchmarks/photos_fashion_mnist_cache.py --other-src /tmp/main_src/src [--work /tmp/fm-cache]
       [--repeats 2] [--epoch-per-class 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE_SRC = str(Path(__file__).resolve().parents[1] / "src")

TIMED = """
import json, sys, time
from imgcls.data import load_dataset
out = sys.argv[1]
t0 = time.perf_counter()
load_dataset(out + "/train")
load_dataset(out + "/test", require_labels=False)
t1 = time.perf_counter()
data = load_dataset(out + "/train")
t2 = time.perf_counter()
assert data.from_cache
print(json.dumps({"build_s": t1 - t0, "reread_s": t2 - t1, "checksum": int(data.images[:5000].sum())}))
"""


def run_tree(src: str, work: Path) -> dict:
    for cache in work.glob("*/.imgcls_cache"):
        shutil.rmtree(cache)
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run([sys.executable, "-c", TIMED, str(work)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def epoch_seconds(src: str, work: Path, per_class: int) -> float:
    out = work.parent / (work.name + "-run")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "imgcls", "train", str(work / "train"), "--out", str(out),
                    "--model", "scratch-cnn", "--epochs", "1", "--precision", "fp32", "--per-class", str(per_class)],
                   env={**os.environ, "PYTHONPATH": src}, check=True, capture_output=True)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", required=True, help="src/ folder of the code to compare against")
    parser.add_argument("--work", default="/tmp/fm-cache")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epoch-per-class", type=int, default=1000, help="0: no training epoch")
    args = parser.parse_args()
    work = Path(args.work)
    if not (work / "train" / "train.csv").exists():
        sys.path.insert(0, HERE_SRC)
        from imgcls.data.fashion_mnist import write_contest_layout
        write_contest_layout(work)
    rows = []
    for repeat in range(args.repeats):
        for name, src in (("other", args.other_src), ("this", HERE_SRC)):
            result = run_tree(src, work)
            if args.epoch_per_class:
                result["epoch_s"] = epoch_seconds(src, work, args.epoch_per_class)
            rows.append({"tree": name, "repeat": repeat, **result, "load": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    sums = {r["checksum"] for r in rows}
    print(f"same pixels in both trees: {len(sums) == 1}")
    for name in ("other", "this"):
        mine = [r for r in rows if r["tree"] == name]
        print(f"{name}: build {min(r['build_s'] for r in mine):.2f} s, "
              f"cached re-read {min(r['reread_s'] for r in mine):.3f} s"
              + (f", scratch-cnn epoch {min(r['epoch_s'] for r in mine):.1f} s" if args.epoch_per_class else "")
              + f" (best of {len(mine)})")


if __name__ == "__main__":
    main()
