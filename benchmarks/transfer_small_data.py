"""Target (b): 100 labelled images per class, best transfer strategy vs the scratch CNN, per seed.

Usage: python benchmarks/transfer_small_data.py DATA_DIR [--seeds 0,1,2] [--image-size 96]
Transfer recipe (LP-FT, DESIGN.md): `head` on cached features fits the new head to convergence,
then `finetune` starts from that run's model.safetensors (--weights) with the backbone at lr x1.0.
All on the same official 10k test set. Validation is held small (2%) because with 900 training
images every epoch's validation pass through the backbone would otherwise dominate the time.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from transfer_common import print_table, timed_run

COMMON = dict(per_class=100, val_fraction=0.02)


def one_seed(data: Path, runs: Path, seed: int, model: str, side: int, ft_epochs: int) -> list[dict]:
    scratch = timed_run(data, runs / f"scratch-s{seed}", model="scratch-cnn", strategy="scratch",
                        epochs=40, seed=seed, **COMMON)
    probe = timed_run(data, runs / f"head-s{seed}", model=model, strategy="head", pretrained=True,
                      image_size=side, epochs=40, lr=3e-3, augment="none", seed=seed, **COMMON)
    lpft = timed_run(data, runs / f"lpft-s{seed}", model=model, strategy="finetune",
                     weights=str(runs / f"head-s{seed}" / "model.safetensors"), warmup_epochs=0,
                     backbone_lr_mult=1.0, lr=1e-3, image_size=side, epochs=ft_epochs, seed=seed, **COMMON)
    return [dict(r, seed=seed, what=w) for r, w in ((scratch, "scratch-cnn"), (probe, "head"), (lpft, "head+ft"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-small"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--ft-epochs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += one_seed(args.data, args.runs, seed, args.model, args.image_size, args.ft_epochs)
        print_table(rows, ["seed", "what", "wall_s", "val_acc", "test_acc"])
    means = {w: statistics.mean(r["test_acc"] for r in rows if r["what"] == w) for w in ("scratch-cnn", "head", "head+ft")}
    best = max(("head", "head+ft"), key=means.get)
    gap = 100 * (means[best] - means["scratch-cnn"])
    print(f"mean test accuracy: {means}; best transfer {best} {gap:+.2f} points vs scratch "
          f"({'meets' if gap >= 3 else 'misses'} the +3 target)")


if __name__ == "__main__":
    main()
