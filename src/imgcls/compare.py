"""imgcls compare: a grid of models x strategies x labelled-set sizes x seeds, scored on one test set.

Every cell is a normal run folder under the compare folder; a cell with eval.json is finished and is
never trained again, an incomplete one resumes, so a killed grid loses at most one epoch. A cell whose
settings changed since it ran (another budget, lr, image size...) is moved to superseded/ and trained
again, so the leaderboard never mixes runs made under different settings and no earlier run is lost.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgcls import fileio
from imgcls.advise import advise
from imgcls.config import TrainConfig
from imgcls.ensemble import build_ensemble
from imgcls.errors import OptionError
from imgcls.evaluate.report import number_or_dash, write_report
from imgcls.evaluate.scoring import evaluate_run
from imgcls.models import get_spec
from imgcls.train.run_folder import RunFolder, config_differences
from imgcls.train.runner import fit
from imgcls.train.strategies import get_strategy

# The compare folder's own files (each cell is a RunFolder).
LEADERBOARD_FILE = "leaderboard.csv"
ADVICE_FILE = "advice.json"
GRID_FILE = "compare.json"
SUPERSEDED_DIR = "superseded"


@dataclass(frozen=True)
class Grid:
    """What a comparison trains: (model, strategy) pairs x per-class sizes x seeds, plus shared settings."""

    pairs: tuple[tuple[str, str], ...]
    per_class: tuple[int | None, ...]
    seeds: tuple[int, ...] = (0,)
    time_budget_s: float | None = None
    epochs: int = 30
    val_fraction: float = 0.1
    test_limit: int | None = None
    """Score on a fixed seeded subset of the test set (same images for every cell) to save time."""
    train_overrides: dict = field(default_factory=dict)
    extra: tuple = ()
    """Cells outside the product, e.g. a cheap model on all the data where a backbone would take hours."""
    teaching: tuple = ()
    """Teaching steps after the cells: an ensemble of finished cells, and a student distilled from it."""
    ensembles: tuple = ()
    """Ensembles scored last, each a tuple of cells (grid cells, or students: Teaching.student_cell())."""

    def cells(self) -> list["Cell"]:
        grid = itertools.product(self.pairs, self.per_class, self.seeds)
        product = [Cell(m, s, pc, seed) for (m, s), pc, seed in grid]
        return product + [c for c in self.extra if c not in product]


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    model: str
    strategy: str
    per_class: int | None
    seed: int

    teacher: str | None = None  # a folder of the compare folder (a cell or an ensemble) that teaches it
    tag: str = ""  # how the teacher teaches, when not by distillation alone (e.g. pseudo-labels)
    settings: tuple = ()
    """(TrainConfig field, value) pairs for this cell only, over the grid's: a recipe (the LP-FT
    settings of a backbone on little data) or its own number of epochs."""

    @property
    def name(self) -> str:
        taught = f"-taught-by-{self.teacher}" if self.teacher else ""
        return f"{self.model}-{self.strategy}-pc{self.per_class or 'all'}-s{self.seed}{taught}" + \
            (f"-{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Teaching:
    """The professor teaches the student: the named cells' ensemble (or the one cell) is the
    teacher of `student`, a cell trained on its probabilities (train/distill.py)."""

    teachers: tuple[Cell, ...]
    student: Cell
    student_settings: tuple = ()
    """(TrainConfig field, value) pairs for the student only, e.g. (("distill_weight", 0.0),
    ("unlabelled", UNLABELLED_IS_TRAIN)) to pseudo-label the training images the student's
    per-class subset leaves out."""

    @property
    def teacher_name(self) -> str:
        if len(self.teachers) == 1:
            return self.teachers[0].name
        return "ensemble-" + "+".join(f"{c.model}-{c.strategy}-pc{c.per_class or 'all'}-s{c.seed}"
                                      for c in self.teachers)

    def student_cell(self) -> Cell:
        pseudo = any(k == "unlabelled" for k, _ in self.student_settings)
        return dataclasses.replace(self.student, teacher=self.teacher_name, tag="pseudo-labels" if pseudo else "")


# The small-data transfer recipe measured on 100 Fashion-MNIST images per class (README, "LP-FT"):
# a 40-epoch linear probe, then 30 fine-tune epochs in batches of 32 with frozen BatchNorm statistics.
LPFT_SMALL_DATA = (("image_size", 96), ("epochs", 30), ("batch_size", 32), ("lr", 1e-3),
                   ("backbone_lr_mult", 1.0), ("warmup_epochs", 0), ("head_probe_epochs", 40),
                   ("bn_stats", "frozen"), ("augment", "flip-shift-erase"))
UNLABELLED_IS_TRAIN = "<train>"  # Teaching.student_settings: the grid's own training folder

# quick, the demo's story on Fashion-MNIST (60k, 28 px), each row on the whole official test set:
# the scratch CNN on all the data; with 100 labels per class, the scratch CNN against Lite0 LP-FT
# (the professor); and the student (the scratch CNN again, on the same 100 labels per class) that
# learns from the professor through confident pseudo-labels on the other training images, whose
# labels it never sees; last, the professor and the student as an ensemble. Every cell is sized in
# epochs, measured to fit 30 minutes on 2 CPU cores (README); the time budget is only a cap (the report
# says which cells it cut short).
# The 5-minute scratch recipe in epochs (README "The scratch baseline in five minutes"): no
# validation split, so the model at the schedule's end is kept (a 2% split's 1,200 images pick
# among nearly equal epochs by noise) and trains on every image.
SPEEDRUN_ALL = (("epochs", 9), ("val_fraction", 0.0))
LPFT_100 = Cell("efficientnet_lite0", "finetune", 100, 0, settings=LPFT_SMALL_DATA)
STUDENT_100 = Teaching(teachers=(LPFT_100,), student=Cell("scratch-cnn", "scratch", 100, 0, settings=(("epochs", 8),)),
                       student_settings=(("distill_weight", 0.0), ("unlabelled", UNLABELLED_IS_TRAIN)))
STORY = Grid(pairs=(), per_class=(), seeds=(0,), time_budget_s=900, epochs=40, val_fraction=0.02,
             extra=(Cell("scratch-speedrun", "scratch", None, 0, settings=SPEEDRUN_ALL),
                    Cell("scratch-cnn", "scratch", 100, 0), LPFT_100),
             teaching=(STUDENT_100,), ensembles=((LPFT_100, STUDENT_100.student_cell()),))

# grid: the scratch CNN at three sizes and all data, Lite0 frozen-feature head and full fine-tune
# at three sizes, in 75-second cells (Lite0 on all 54k images would need ~7 min per feature pass
# alone). A 2% validation split and a 2,000-image test subset keep Lite0's 96-px forward passes
# (the slowest part of a cell on a CPU) from eating the budget.
PRESETS: dict[str, Grid] = {
    "quick": STORY,
    "grid": Grid(pairs=(("scratch-cnn", "scratch"), ("efficientnet_lite0", "head"),
                        ("efficientnet_lite0", "finetune")),
                 per_class=(10, 100, 1000), seeds=(0,), time_budget_s=75, epochs=30,
                 val_fraction=0.02, test_limit=2000, extra=(Cell("scratch-cnn", "scratch", None, 0),)),
    "full": Grid(pairs=(("scratch-cnn", "scratch"), ("efficientnet_lite0", "head"),
                        ("efficientnet_lite0", "partial"), ("efficientnet_lite0", "finetune"),
                        ("efficientnet_lite0", "scratch")),
                 per_class=(10, 100, 1000, None), seeds=(0, 1, 2), time_budget_s=600, epochs=40,
                 val_fraction=0.05, test_limit=None),
}


def number_or_none(value: float | None) -> float | None:
    """A validation accuracy for the leaderboard: None for a run that validated no image (run.json's null)."""
    return round(value, 4) if value is not None else None


def parse_per_class(text: str) -> tuple[int | None, ...]:
    """'10,100,all' -> (10, 100, None)."""
    out: list[int | None] = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise OptionError(f"--per-class {text!r}: use positive integers or 'all', e.g. 10,100,all")
    return tuple(out)


def make_pairs(models: list[str], strategies: list[str]) -> tuple[tuple[str, str], ...]:
    """Every valid (model, strategy): models without pretrained weights only train from scratch."""
    chosen = [get_strategy(name) for name in strategies]  # unknown names fail here, listing the valid ones
    pairs = []
    for model in models:
        spec = get_spec(model)  # unknown names fail here, listing the valid ones
        for strategy in chosen:
            if not strategy.transfers or spec.pretrained_available:
                pairs.append((model, strategy.name))
    if not pairs:
        raise OptionError("no valid (model, strategy) pair: scratch CNNs take only --strategies scratch")
    return tuple(pairs)


def cell_config(train_dir: str | os.PathLike, grid: Grid, cell: Cell, out: Path | None = None,
                settings: tuple = ()) -> TrainConfig:
    """The TrainConfig of one cell: same split rule, seed and budget as every other cell."""
    teacher = {"teacher": str(Path(out) / cell.teacher)} if cell.teacher else {}
    own = {k: str(train_dir) if v == UNLABELLED_IS_TRAIN else v for k, v in (*cell.settings, *settings)}
    return TrainConfig(data_dir=str(train_dir), model=cell.model, strategy=cell.strategy,
                       pretrained=get_strategy(cell.strategy).transfers, per_class=cell.per_class, seed=cell.seed,
                       **{"epochs": grid.epochs, "time_budget_s": grid.time_budget_s,
                          "val_fraction": grid.val_fraction, **grid.train_overrides, **teacher, **own})


def evaluate_cell(run_dir: Path, test_dir: str | os.PathLike, labels: str | os.PathLike | None,
                  limit: int | None) -> dict:
    """Score the cell's best model on the (fixed subset of the) test set, keeping the probabilities
    for the report."""
    return evaluate_run(run_dir, test_dir, labels, limit=limit, keep_proba=True)


def is_trained(run_dir: Path) -> bool:
    return RunFolder(run_dir).is_complete()


def is_finished(run_dir: Path) -> bool:
    """Trained and scored: run.json complete and eval.json written after it."""
    return is_trained(run_dir) and RunFolder(run_dir).has(RunFolder.EVAL)


def scored_on(run_dir: Path, test_dir, labels, limit: int | None) -> bool:
    """eval.json was made on this test set, answer key and subset (else the cell is scored again)."""
    ev = RunFolder(run_dir).read_eval()
    return (ev.get("data_dir"), ev.get("labels"), ev.get("test_limit")) == \
        (str(test_dir), str(labels) if labels else None, limit)


def cell_settings(config: TrainConfig) -> dict:
    """What a cell must share with its earlier run to be reused. Unlike a resumed `train`, the epoch
    cap and time budget count: cells trained under different budgets would not compare fairly."""
    obj = config.to_json()
    obj.pop("extra")
    return obj


def set_aside_if_changed(run_dir: Path, config: TrainConfig, superseded: Path) -> tuple[Path, list[str]] | None:
    """Move a cell folder whose stored settings differ from `config` out of the way; (new place, diffs)."""
    folder = RunFolder(run_dir)
    if not folder.has(RunFolder.CONFIG):
        return None
    old = folder.read_config()
    diffs = config_differences(cell_settings(old), cell_settings(config))
    if not diffs:
        return None
    superseded.mkdir(parents=True, exist_ok=True)
    target = superseded / f"{run_dir.name}-{old.hash()}"
    n = 1
    while target.exists():  # the same settings superseded twice: keep both
        n += 1
        target = superseded / f"{run_dir.name}-{old.hash()}-{n}"
    run_dir.rename(target)
    return target, diffs


def run_cell(run_dir: Path, config: TrainConfig, test_dir, labels, test_limit: int | None,
             log: Callable[[str], None]) -> None:
    """Train (or resume) one cell, then score it; a trained cell whose test set changed is only scored."""
    if not is_trained(run_dir):
        fit(config, run_dir, log=log)
    evaluate_cell(run_dir, test_dir, labels, test_limit)


def budget_note(run_dir: Path) -> str:
    """How the cell went against its time budget, from run.json (older runs: nothing): the time its
    clock counted, what was cut, and where most of the time went."""
    budget = RunFolder(run_dir).read_run().get("budget")
    if not budget:
        return ""
    over = f", {budget['over_s']:.1f}s ({budget['over_pct']:.0f}%) over" if budget["over_s"] else ", within it"
    cut = f"; cut: {', '.join(budget['cuts'])}" if budget["cuts"] else ""
    phases = sorted(budget.get("phases", {}).items(), key=lambda kv: -kv[1])[:3]  # older runs: none
    spent = f"; most of it: {', '.join(f'{k} {v:.0f}s' for k, v in phases)}" if phases else ""
    counted = "training" if "counted_from" not in budget else "the cell"  # older runs counted from the data load
    return f" ({counted} {budget['seconds']:.0f}s of a {budget['budget_s']:.0f}s budget{over}{cut}{spent})"


def run_grid(train_dir: str | os.PathLike, test_dir: str | os.PathLike, out: str | os.PathLike, grid: Grid,
             labels: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every unfinished cell in order, then write leaderboard.csv and return its rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_json(out / GRID_FILE, {"train_dir": str(train_dir), "test_dir": str(test_dir),
                                        "labels": str(labels) if labels else None,
                                        "cells": [c.name for c in grid.cells()],
                                        "test_limit": grid.test_limit, "time_budget_s": grid.time_budget_s})
    cells = grid.cells()
    for i, cell in enumerate(cells, 1):
        run_dir, config = out / cell.name, cell_config(train_dir, grid, cell, out)
        moved = set_aside_if_changed(run_dir, config, out / SUPERSEDED_DIR)
        if moved:
            log(f"[{i}/{len(cells)}] {cell.name}: settings changed since it ran ({'; '.join(moved[1])}); "
                f"earlier run moved to {moved[0]}")
        if is_finished(run_dir) and scored_on(run_dir, test_dir, labels, grid.test_limit):
            log(f"[{i}/{len(cells)}] {cell.name}: finished earlier, skipped")
            continue
        log(f"[{i}/{len(cells)}] {cell.name}")
        t0 = time.perf_counter()
        run_cell(run_dir, config, test_dir, labels, grid.test_limit, log)
        log(f"[{i}/{len(cells)}] {cell.name}: done in {time.perf_counter() - t0:.0f}s{budget_note(run_dir)}")
    for teaching in grid.teaching:
        cells += teach(train_dir, test_dir, out, grid, teaching, labels, log)
    for members in grid.ensembles:
        log(f"[ensemble] {ensemble_name(members)}")
        cells.append(scored_ensemble(out, ensemble_name(members), members, test_dir, labels, grid, log))
    rows = leaderboard(out, cells)
    write_leaderboard(out / LEADERBOARD_FILE, rows)
    return rows


def teach(train_dir, test_dir, out: Path, grid: Grid, teaching: Teaching, labels,
          log: Callable[[str], None]) -> list:
    """The teaching step: the teachers' ensemble (built and scored once), then the student cell."""
    done = []
    if len(teaching.teachers) > 1:
        done.append(scored_ensemble(out, teaching.teacher_name, teaching.teachers, test_dir, labels, grid, log))
    student = teaching.student_cell()
    run_dir, config = out / student.name, cell_config(train_dir, grid, student, out, teaching.student_settings)
    set_aside_if_changed(run_dir, config, out / SUPERSEDED_DIR)
    if not (is_finished(run_dir) and scored_on(run_dir, test_dir, labels, grid.test_limit)):
        log(f"[teach] {student.name}")
        run_cell(run_dir, config, test_dir, labels, grid.test_limit, log)
    return done + [student]


def scored_ensemble(out: Path, name: str, members: tuple, test_dir, labels, grid: Grid,
                    log: Callable[[str], None]) -> "EnsembleEntry":
    """The ensemble of finished cells in out/name, built once and scored on the grid's test set."""
    ensemble_dir = out / name
    if not RunFolder(ensemble_dir).is_complete():
        build_ensemble([out / c.name for c in members], ensemble_dir, log=log)
    if not (RunFolder(ensemble_dir).has(RunFolder.EVAL) and scored_on(ensemble_dir, test_dir, labels,
                                                                   grid.test_limit)):
        evaluate_cell(ensemble_dir, test_dir, labels, grid.test_limit)
    return EnsembleEntry(name, members)


def ensemble_name(members: tuple) -> str:
    return "ensemble-" + "+".join(c.name for c in members)


@dataclass(frozen=True)
class EnsembleEntry:
    """A leaderboard entry for an ensemble of cells."""

    name: str
    members: tuple[Cell, ...]


COLUMNS = ["rank", "run", "model", "strategy", "per_class", "seed", "train_images", "test_accuracy",
           "macro_f1", "best_val_acc", "train_seconds", "images_per_s", "parameters",
           "trainable_parameters", "epochs", "pipeline_seconds", "predict_images_per_s", "cut_short", "kind"]


def leaderboard(out: Path, cells: list[Cell]) -> list[dict]:
    """One row per finished cell, read back from its run folder, best test accuracy first."""
    rows = []
    for cell in cells:
        run_dir = out / cell.name
        if not is_finished(run_dir):
            continue
        run, ev = RunFolder(run_dir).read_run(), RunFolder(run_dir).read_eval()
        if isinstance(cell, EnsembleEntry):
            rows.append(ensemble_row(out, cell, run, ev))
            continue
        kind = "student" if cell.teacher else "transfer" if get_strategy(cell.strategy).transfers else "scratch"
        rows.append({"run": cell.name, "model": cell.model, "kind": kind,
                     "strategy": cell.strategy + (f" + {cell.tag or 'distill'}" if cell.teacher else ""),
                     "per_class": cell.per_class or "all", "seed": cell.seed,
                     "train_images": run["data"]["train"], "test_accuracy": round(ev["accuracy"], 4),
                     "macro_f1": round(ev["macro_f1"], 4), "best_val_acc": number_or_none(run["best_val_acc"]),
                     "train_seconds": run["train_seconds"], "images_per_s": run["images_per_s"],
                     "parameters": run["parameters"], "trainable_parameters": run["trainable_parameters"],
                     "epochs": run["epochs"], **cost_columns(out, cell, run, ev)})
    rows.sort(key=lambda r: (-r["test_accuracy"], r["run"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return [{c: row.get(c) for c in COLUMNS} for row in rows]


def pipeline_runs(run_dir: Path) -> dict[Path, float]:
    """Every run that had to be trained to make this model, with its training seconds: itself, a
    student's teacher's pipeline, an ensemble's members' (a run shared by two paths counts once).
    A teacher moved away since adds nothing."""
    folder = RunFolder(run_dir)
    if not folder.is_complete():
        return {}
    if folder.is_ensemble():
        return {k: v for m in folder.read_ensemble()["members"] for k, v in pipeline_runs(Path(m)).items()}
    run = folder.read_run()
    teacher = (run.get("teacher") or {}).get("run")
    return {**(pipeline_runs(Path(teacher)) if teacher else {}), Path(run_dir).resolve(): run["train_seconds"]}


def pipeline_seconds(run_dir: Path) -> float:
    """What it took to make this model: the training seconds of every run in its pipeline."""
    return sum(pipeline_runs(run_dir).values())


def cost_columns(out: Path, cell, run: dict, ev: dict) -> dict:
    """The columns that say what a row cost: the whole pipeline's training seconds, inference
    images/s on the test set, and what the time budget cut short ("" where nothing was)."""
    budget = run.get("budget") or {}
    return {"pipeline_seconds": round(pipeline_seconds(out / cell.name), 1),
            "predict_images_per_s": ev.get("predict_images_per_s"),
            "cut_short": "+".join(budget.get("cuts") or [])}


def ensemble_row(out: Path, entry: EnsembleEntry, run: dict, ev: dict) -> dict:
    """An ensemble's leaderboard row: its members' training added up (they all had to be trained)."""
    members = [RunFolder(out / c.name).read_run() for c in entry.members]
    sizes = {c.per_class or "all" for c in entry.members}
    return {"run": entry.name, "model": "ensemble", "kind": "ensemble", "strategy": f"mean of {len(members)}",
            "per_class": sizes.pop() if len(sizes) == 1 else "mixed", "seed": "-",
            "train_images": max(m["data"]["train"] for m in members),
            "test_accuracy": round(ev["accuracy"], 4), "macro_f1": round(ev["macro_f1"], 4),
            "best_val_acc": number_or_none(run.get("best_val_acc")),
            "train_seconds": round(sum(m["train_seconds"] for m in members), 2), "images_per_s": None,
            "parameters": run["parameters"], "trainable_parameters": run["parameters"], "epochs": None,
            **cost_columns(out, entry, run, ev)}


def write_leaderboard(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fileio.write_text(path, buffer.getvalue())


def read_leaderboard(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def markdown_table(rows: list[dict]) -> str:
    """The leaderboard as a markdown table for the terminal and the README."""
    head = ["#", "run", "labelled/class", "test acc", "macro-F1", "train s", "pipeline s", "predict img/s",
            "params", "budget"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cut = f"cut short: {r['cut_short']}" if r.get("cut_short") else "-"
        lines.append(f"| {r['rank']} | {r['model']} / {r['strategy']} (seed {r['seed']}) | {r['per_class']} | "
                     f"{float(r['test_accuracy']):.4f} | {float(r['macro_f1']):.4f} | "
                     f"{number_or_dash(r['train_seconds'])} | {number_or_dash(r.get('pipeline_seconds'))} | "
                     f"{number_or_dash(r.get('predict_images_per_s'))} | "
                     f"{int(r['parameters']) / 1e6:.2f}M | {cut} |")
    return "\n".join(lines)


def advice_for(train_dir: str | os.PathLike, out: Path, log: Callable[[str], None]) -> dict:
    """The advisor's verdict for the report, measured once per compare folder."""
    path = out / ADVICE_FILE
    if path.exists():
        return fileio.read_json(path)
    advice = advise(train_dir, log=log)
    record = {**advice.to_json(), "summary": advice.summary()}
    fileio.write_json(path, record)
    return record


def run_compare(train_dir: str | os.PathLike, test_dir: str | os.PathLike, out: str | os.PathLike, grid: Grid,
                labels: str | os.PathLike | None = None, with_advice: bool = True,
                log: Callable[[str], None] = print) -> tuple[list[dict], Path]:
    """Advisor, grid, leaderboard and report.html: the one-command answer to 'does transfer help here?'"""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    advice = advice_for(train_dir, out, log) if with_advice else None
    if advice:
        log("\n".join(["advisor:", *("  " + line for line in advice["summary"].splitlines())]))
    rows = run_grid(train_dir, test_dir, out, grid, labels, log)
    return rows, write_report(out, rows, advice)
