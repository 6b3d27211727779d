"""Test accuracy per --resize policy (crop / squash / pad) on the camera-sized photo sets of
benchmarks/photos_at_scale.py: Lite0 head and LP-FT, trained on a few images per class of the
training set and scored on a separately drawn test set (other crops of the same photographs, mixed
landscape and portrait shapes).

Usage: python benchmarks/photos_resize_accuracy.py [--work /tmp/photos-bench] [--per-class 10]
       [--epochs 3] [--test-images 1000] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HERE_SRC = str(HERE.parent / "src")
sys.path.insert(0, str(HERE))
sys.path.insert(0, HERE_SRC)

from photos_at_scale import make_dataset  # noqa: E402

STRATEGIES = {"head": ["--strategy", "head"],
              "lp-ft": ["--strategy", "finetune", "--batch-size", "32", "--lr", "1e-3", "--bn-stats", "frozen"]}


def train(root: Path, out: Path, policy: str, strategy: str, args) -> None:
    cmd = [sys.executable, "-m", "imgcls", "train", str(root), "--out", str(out), "--overwrite",
           "--model", "efficientnet_lite0", "--pretrained", "--image-size", "96", "--resize", policy,
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--per-class", str(args.per_class),
           *STRATEGIES[strategy]]
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": HERE_SRC}, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/photos-bench")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    work = Path(args.work)
    root = make_dataset(work / f"photos-{args.train_images}", args.train_images)
    test = make_dataset(work / f"photos-test-{args.test_images}", args.test_images, seed=1)
    from imgcls.evaluate.scoring import evaluate_run  # after the writer pool: imgcls handles SIGTERM
    for seed in map(int, args.seeds.split(",")):
        args.seed = seed
        for strategy in STRATEGIES:
            for policy in ("crop", "squash", "pad"):
                out = work / "resize-runs" / f"{strategy}-{policy}-{seed}"
                train(root, out, policy, strategy, args)
                metrics = evaluate_run(out, test)
                run = json.loads((out / "run.json").read_text())
                print(json.dumps({"strategy": strategy, "resize": policy, "seed": seed,
                                  "per_class": args.per_class, "test_accuracy": metrics["accuracy"],
                                  "val_acc": run.get("best_val_acc"), "train_s": run.get("train_seconds"),
                                  "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
