"""The best pipeline on all of Fashion-MNIST within a training budget: from-scratch CNNs and an
ImageNet professor, combined into one ensemble, scored on the official 10k test set.

Usage: python benchmarks/teach_full_data.py DATA_DIR [--speedrun-seeds 0,1,2] [--cnn-seeds 0,1]
       [--lite0-budget 50m] [--lite0-epochs 16] [--runs runs/bench-teach-full]

Runs, one after another (each a run folder under --runs; a finished one is reused, not retrained):
- speedrun-sS: `scratch-speedrun --epochs 15 --time-budget 5m --val-fraction 0`, one per seed;
- cnn-sS:      `scratch-cnn --epochs 20 --time-budget 12m --val-fraction 0`, one per seed;
- lite0:       EfficientNet-Lite0 LP-FT at 64 px (transfer_full_finetune.py's recipe: a head probe on
               frozen features, then the whole network for --lite0-epochs within what is left of
               --lite0-budget; another epoch count than 16 names the folders lite0-eN and ens-eN);
- ens-scratch: the scratch runs, equal weights;  ens: lite0 + ens-scratch, 0.5 / 0.5 (fixed in
               advance: no weight is chosen on the test set).
No test image is used in training. `pipeline_s` sums the training commands' wall time: every
training second of the models an ensemble holds, each counted once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgcls.config import parse_duration
from imgcls.ensemble import build_ensemble
from imgcls.runtime import cpu_kind
from imgcls.train.run_folder import RunFolder
from transfer_common import fit_timed, test_scores

SPEEDRUN = dict(model="scratch-speedrun", epochs=15, time_budget_s=300, val_fraction=0.0)
CNN = dict(model="scratch-cnn", epochs=20, time_budget_s=720, val_fraction=0.0)
LITE0 = dict(model="efficientnet_lite0", pretrained=True, image_size=64, val_fraction=0.02)
LITE0_EPOCHS = 16


def train(data: Path, out: Path, **settings) -> dict:
    """Train (or reuse a finished run, keeping the wall time it recorded) and score it."""
    run, wall = fit_timed(data, out, reuse=True, **settings)
    return {"what": out.name, "wall_s": wall, "pipeline_s": wall, "epochs": run["epochs"], **test_scores(data, out)}


def combine(data: Path, out: Path, members: list[dict], runs: Path) -> dict:
    if not RunFolder(out).is_complete():
        build_ensemble([runs / m["what"] for m in members], out)
    pipeline = round(sum(m["pipeline_s"] for m in members), 1)
    return {"what": out.name, "wall_s": "", "pipeline_s": pipeline, "epochs": "", **test_scores(data, out)}


def lite0(data: Path, runs: Path, budget_s: float, epochs: int) -> dict:
    """LP-FT: the probe's wall time counts against the budget; the fine-tune gets the rest."""
    probe = train(data, runs / "lite0-probe", strategy="head", epochs=20, lr=3e-3, augment="none", **LITE0)
    tuned = train(data, runs / f"lite0{epochs_tag(epochs)}", strategy="finetune",
                  weights=str(runs / "lite0-probe" / "model.safetensors"),
                  warmup_epochs=0, head_probe_epochs=0, backbone_lr_mult=1.0, lr=1e-3, augment="flip-shift-erase",
                  epochs=epochs, time_budget_s=budget_s - probe["wall_s"], **LITE0)
    tuned["pipeline_s"] = round(probe["wall_s"] + tuned["wall_s"], 1)
    return tuned


def epochs_tag(epochs: int) -> str:
    """What sets a Lite0 fine-tune of another length apart in folder names ("" for the 16 epochs
    the 63-minute Zen 4 run fitted)."""
    return "" if epochs == LITE0_EPOCHS else f"-e{epochs}"


def print_rows(rows: list[dict]) -> None:
    columns = ["what", "test_acc_tta", "test_acc", "wall_s", "pipeline_s", "epochs", "predict_img_s"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-teach-full"))
    ap.add_argument("--speedrun-seeds", default="0,1,2")
    ap.add_argument("--cnn-seeds", default="0,1", help="empty for none")
    ap.add_argument("--lite0-budget", default="50m", help="the probe and the fine-tune together")
    ap.add_argument("--lite0-epochs", type=int, default=LITE0_EPOCHS,
                    help="the fine-tune's epochs (the budget still caps them; a faster CPU fits more)")
    args = ap.parse_args()
    print(f"CPU: {cpu_kind()}")
    seeds = lambda text: [int(s) for s in text.split(",") if s.strip()]
    scratch = [train(args.data, args.runs / f"speedrun-s{s}", seed=s, **SPEEDRUN)
               for s in seeds(args.speedrun_seeds)]
    scratch += [train(args.data, args.runs / f"cnn-s{s}", seed=s, **CNN) for s in seeds(args.cnn_seeds)]
    print_rows(scratch)
    ens_scratch = combine(args.data, args.runs / "ens-scratch", scratch, args.runs)
    professor = lite0(args.data, args.runs, parse_duration(args.lite0_budget), args.lite0_epochs)
    best = combine(args.data, args.runs / f"ens{epochs_tag(args.lite0_epochs)}", [professor, ens_scratch], args.runs)
    print_rows(scratch + [ens_scratch, professor, best])


if __name__ == "__main__":
    main()
