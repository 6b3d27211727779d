"""The professor teaches the student on little labelled data: 100 labels per class, the other
Fashion-MNIST training images as unlabelled data, scored on the official 10k test set.

Usage: python benchmarks/teach_small_data.py DATA_DIR [--seeds 0] [--targets soft,hard]
       [--threshold 0.9] [--student-epochs 8] [--student-model scratch-cnn] [--rounds 1]
       [--combine mean] [--teacher-tta none] [--student-augment auto] [--runs runs/bench-teach]

Rows per seed (each a run folder under --runs; a finished one is reused, not retrained):
- scratch:  the scratch CNN on the 1,000 labelled images alone (40 epochs);
- teacher:  Lite0 LP-FT at 96 px on the same images (the README's small-data recipe);
- distill:  the scratch CNN on the same 1,000 images, targets = the teacher's probabilities;
- pseudo-*: the scratch CNN on the labelled images (their own labels, --distill-weight 0) plus
            every other training image the teacher gives >= --threshold (soft or hard targets);
            with --rounds N, N such students in a row, each taught by the one before (self-training);
- ens-*:    the teacher and the last pseudo-labelled student as one ensemble (`imgcls ensemble`),
            weighted by --combine (`fit`: on the 2% validation images both held out).
No test image is used in training. `pipeline_s` adds the teacher's training time to a student's
own (and, for a later round, the earlier rounds'): what the whole pipeline cost on this machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgcls.compare import LPFT_SMALL_DATA
from imgcls.config import TTA_MODES
from imgcls.ensemble import build_ensemble
from imgcls.runtime import cpu_kind
from imgcls.train.run_folder import RunFolder
from transfer_common import fit_timed, test_scores

LABELLED = dict(per_class=100, val_fraction=0.02)
TEACHER = dict(model="efficientnet_lite0", strategy="finetune", pretrained=True, **dict(LPFT_SMALL_DATA))


def run(data: Path, out: Path, **settings) -> dict:
    """Train (or reuse a finished run), then score on the official test set."""
    result, wall = fit_timed(data, out, reuse=True, **settings)
    return {"run": out.name, **test_scores(data, out, tta=False), "train_s": result["train_seconds"],
            "wall_s": wall, "epochs": result["epochs"], "train_images": result["data"]["train"],
            "kept": (result.get("pseudo_labels") or {}).get("kept", "")}


def ensemble_row(data: Path, out: Path, members: list[Path], combine: str) -> dict:
    """Combine finished runs (or reuse the ensemble folder) and score it on the official test set."""
    if not RunFolder(out).is_complete():
        build_ensemble(members, out, combine=combine, log=lambda line: print("   ", line, flush=True))
    weights = [round(m["weight"], 3) for m in RunFolder(out).read_run()["members"]]
    return {"run": out.name, **test_scores(data, out, tta=False), "train_s": 0.0, "wall_s": "",
            "epochs": "", "train_images": "", "kept": f"weights {weights}"}


def pseudo_run_name(targets: str, round_: int, seed: int, args) -> str:
    """The run folder of one self-training round; the default student and round 1 keep the short name."""
    model = "" if args.student_model == "scratch-cnn" else f"-{args.student_model}"
    rounds = "" if round_ == 1 else f"-r{round_}"
    tta = "" if args.teacher_tta == "none" else f"-tta{args.teacher_tta}"
    augment = "" if args.student_augment == "auto" else f"-aug{args.student_augment}"
    return f"pseudo-{targets}{model}-t{args.threshold}-e{args.student_epochs}{tta}{augment}{rounds}-s{seed}"


def one_seed(data: Path, runs: Path, seed: int, args) -> list[dict]:
    rows = {"scratch": run(data, runs / f"scratch-s{seed}", model="scratch-cnn", epochs=40, seed=seed, **LABELLED)}
    teacher_dir = runs / f"teacher-lpft-s{seed}"
    rows["teacher"] = run(data, teacher_dir, seed=seed, **TEACHER, **LABELLED)
    teacher_s = RunFolder(teacher_dir).read_run()["train_seconds"]
    rows["distill"] = run(data, runs / f"distill-s{seed}", model="scratch-cnn", epochs=40, seed=seed,
                          teacher=str(teacher_dir), **LABELLED)
    upstream_s = {"distill": teacher_s}  # the training seconds of what taught each student
    for targets in args.targets.split(","):
        teacher, spent = teacher_dir, teacher_s
        for round_ in range(1, args.rounds + 1):  # round 2 on: the last round's student teaches
            what = f"pseudo-{targets}" + (f"-round{round_}" if args.rounds > 1 else "")
            out = runs / pseudo_run_name(targets, round_, seed, args)
            rows[what] = run(data, out, model=args.student_model, epochs=args.student_epochs, seed=seed,
                             teacher=str(teacher), distill_weight=0.0, unlabelled=str(data / "train"),
                             pseudo_threshold=args.threshold, pseudo_targets=targets,
                             teacher_tta=args.teacher_tta, augment=args.student_augment, **LABELLED)
            upstream_s[what] = spent
            teacher, spent = out, spent + rows[what]["train_s"]
        what = f"ens-{targets}-{args.combine}"  # the professor and his last student answer together
        rows[what] = ensemble_row(data, runs / f"{what}-{teacher.name}", [teacher_dir, teacher], args.combine)
        upstream_s[what] = spent
    for what, row in rows.items():
        row.update(what=what, seed=seed, pipeline_s=round(row["train_s"] + upstream_s.get(what, 0.0), 1))
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", type=Path, default=Path("runs/bench-teach"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--targets", default="soft,hard")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--student-epochs", type=int, default=8)
    ap.add_argument("--student-model", default="scratch-cnn", help="the pseudo-labelled student's model")
    ap.add_argument("--rounds", type=int, default=1,
                    help="self-training rounds: each after the first is taught by the previous round's student")
    ap.add_argument("--teacher-tta", default="none", choices=TTA_MODES,
                    help="the teacher's test-time augmentation when it pseudo-labels")
    ap.add_argument("--student-augment", default="auto",
                    help="the pseudo-labelled student's --augment (auto: flip, as for any 10k+ images)")
    ap.add_argument("--combine", default="mean", choices=["mean", "fit"],
                    help="how the teacher + student ensemble weighs its two members")
    args = ap.parse_args()
    print(f"CPU: {cpu_kind()}")
    rows = [row for seed in map(int, args.seeds.split(",")) for row in one_seed(args.data, args.runs, seed, args)]
    columns = ["what", "seed", "test_acc", "train_s", "pipeline_s", "wall_s", "epochs", "train_images", "kept",
               "predict_img_s"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))


if __name__ == "__main__":
    main()
