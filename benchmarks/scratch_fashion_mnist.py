"""Issue targets for the foundation on the real Fashion-MNIST, on this machine.

1. import into the contest layout + cache build (target <= 60 s), second cache read (<= 2 s);
2. the scratch CNN within a 5-minute training budget: official 10k test accuracy (target >= 94.0%).

Usage: python benchmarks/scratch_fashion_mnist.py [--work /tmp/fm-bench] [--budget 5m] [--skip-import]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from imgcls.config import TrainConfig, parse_duration
from imgcls.data import load_dataset
from imgcls.data.fashion_mnist import write_contest_layout
from imgcls.evaluate.scoring import evaluate_run
from imgcls.train.runner import fit


def time_import(out: Path) -> dict:
    """Fresh import + cache build, then a second (cached) read."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_contest_layout(out)
    t1 = time.perf_counter()
    load_dataset(out / "train")
    load_dataset(out / "test", require_labels=False)
    t2 = time.perf_counter()
    cached = load_dataset(out / "train")
    t3 = time.perf_counter()
    assert cached.from_cache
    return {"import_s": t1 - t0, "cache_build_s": t2 - t1, "cached_read_s": t3 - t2}


def register_sweep_variant(name: str) -> str:
    """Make a shape from scratch_sweep.py's VARIANTS trainable by name (sweep-<name>)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from scratch_sweep import VARIANTS

    from imgcls.models.registry import ModelSpec, register_model
    from imgcls.models.scratch import _builder

    widths, depths, hidden, *drop = VARIANTS[name]
    kwargs = {"hidden": hidden, **({"drop_rate": drop[0]} if drop else {})}
    register_model(ModelSpec(f"sweep-{name}", _builder(widths, depths, **kwargs), "sweep variant"))
    return f"sweep-{name}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/fm-bench"))
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--model", default="scratch-cnn")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--skip-import", action="store_true")
    parser.add_argument("--variant", help="a scratch_sweep.py shape instead of --model")
    args = parser.parse_args()
    if args.variant:
        from imgcls.models.registry import get_spec
        get_spec("scratch-cnn")  # load the built-in registry first
        args.model = register_sweep_variant(args.variant)
    rows = []
    if not args.skip_import:
        t = time_import(args.work / "data")
        rows += [("import 70k PNGs (contest layout)", f"{t['import_s']:.1f} s"),
                 ("build decode cache (train + test)", f"{t['cache_build_s']:.1f} s"),
                 ("import + cache (target <= 60 s)", f"{t['import_s'] + t['cache_build_s']:.1f} s"),
                 ("second read of train from cache (target <= 2 s)", f"{t['cached_read_s']:.2f} s")]
    data = args.work / "data"
    run_dir = args.work / f"run-{args.model}"
    config = TrainConfig(data_dir=str(data / "train"), model=args.model, epochs=args.epochs,
                         time_budget_s=parse_duration(args.budget), batch_size=args.batch_size, lr=args.lr)
    run = fit(config, run_dir, overwrite=True)
    metrics = evaluate_run(run_dir, data / "test", labels=data / "test_labels.csv")
    rows += [(f"{args.model}, batch {args.batch_size}, lr {args.lr:g}: epochs fitted into {args.budget}",
              str(run["epochs"])),
             ("training wall time (target <= 300 s)", f"{run['train_seconds']:.0f} s"),
             ("mean training throughput", f"{run['images_per_s']:.0f} img/s ({run['precision']})"),
             ("best validation accuracy", f"{run['best_val_acc']:.4f} (epoch {run['best_epoch']})"),
             ("official test accuracy (target >= 0.940)", f"{metrics['accuracy']:.4f}"),
             ("test macro-F1", f"{metrics['macro_f1']:.4f}")]
    print("| measurement | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
