"""Target (c): the head strategy on full Fashion-MNIST with cached backbone features, whole run timed.

Usage: python benchmarks/transfer_head_cached.py DATA_DIR [--model efficientnet_lite0] [--image-size 64]
The feature pass (train + validation images through the frozen backbone, once) counts as training
time; epochs then cost only the linear head.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_common import print_table, timed_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-transfer"))
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    row = timed_run(args.data, args.runs / f"head-{args.model}-{args.image_size}", model=args.model,
                    strategy="head", pretrained=True, image_size=args.image_size, epochs=args.epochs,
                    lr=3e-3, augment="none")
    row.update({"model": args.model, "px": args.image_size, "under_10min": row["wall_s"] < 600})
    print_table([row], ["model", "px", "wall_s", "train_s", "val_acc", "test_acc", "under_10min"])


if __name__ == "__main__":
    main()
