"""How far past their time budget the cells of a comparison end: per cell, the budget, the seconds
run.json's budget clock counted (and where they went, by phase), the wall time of the cell's
training call (what the user waits for), and the whole grid's wall time.

Usage: python benchmarks/budget_overrun.py DATA_DIR --out runs/overrun [--preset grid] [--budget 20s]
                                          [--cells NAME,...]   (a subset of the preset's cells)
DATA_DIR holds the contest layout (`imgcls data fashion-mnist DATA_DIR`). The advisor is skipped: it
has no budget. The load average is sampled during the run, since a busy machine is the case that
matters; the output folder is replaced (it holds only this benchmark's cells).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from imgcls import compare
from imgcls.config import parse_duration


class LoadSampler(threading.Thread):
    """The 1-minute load average every few seconds while the grid runs."""

    def __init__(self, every_s: float = 5.0):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.done = every_s, [os.getloadavg()[0]], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        self.done.set()
        return {"min": min(self.samples), "mean": round(statistics.mean(self.samples), 2), "max": max(self.samples)}


def timed(real, walls: dict[str, float], run_dir_arg: int):
    """One of compare's steps (fit, evaluate_cell), with its wall time recorded by run folder name."""

    def step(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            walls[Path(args[run_dir_arg]).name] = time.perf_counter() - start
    return step


def grid_of(preset: str, budget: float, names: str | None) -> compare.Grid:
    grid = dataclasses.replace(compare.PRESETS[preset], time_budget_s=budget)
    if not names:
        return grid
    by_name = {cell.name: cell for cell in grid.cells()}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; the preset's: {', '.join(by_name)}")
    return dataclasses.replace(grid, pairs=(), per_class=(), extra=tuple(by_name[n] for n in names.split(",")),
                               teaching=(), ensembles=())


def overrun(seconds: float, budget: float) -> str:
    return f"{seconds - budget:+.1f} s ({100 * (seconds - budget) / budget:+.0f}%)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="grid", choices=sorted(compare.PRESETS))
    parser.add_argument("--budget", default="20s", help="training budget per cell")
    parser.add_argument("--cells", help="comma-separated cell names (default: all of the preset's)")
    args = parser.parse_args()
    budget = parse_duration(args.budget)
    grid = grid_of(args.preset, budget, args.cells)
    if args.out.exists():
        shutil.rmtree(args.out)
    walls: dict[str, float] = {}
    scoring: dict[str, float] = {}
    compare.fit = timed(compare.fit, walls, 1)  # fit(config, run_dir)
    compare.evaluate_cell = timed(compare.evaluate_cell, scoring, 0)  # evaluate_cell(run_dir, ...)
    load = LoadSampler()
    load.start()
    start = time.perf_counter()
    compare.run_compare(args.data / "train", args.data / "test", args.out, grid, args.data / "test_labels.csv",
                        with_advice=False, log=lambda line: print("   ", line, flush=True))
    wall = time.perf_counter() - start
    loads = load.summary()
    rows = []
    for cell in grid.cells():
        run = json.loads((args.out / cell.name / "run.json").read_text())
        rows.append({"cell": cell.name, "budget_s": budget, "train_seconds": run["train_seconds"],
                     "fit_wall_s": round(walls[cell.name], 1), "scoring_s": round(scoring[cell.name], 1),
                     "epochs": run["epochs"], "over_pct": round(100 * (walls[cell.name] - budget) / budget, 1),
                     "budget_record": run.get("budget")})
    print(f"\n{'cell':<40} {'budget':>7} {'clock s':>8} {'fit wall s':>10} {'test s':>7}  fit wall over budget")
    for r in rows:
        print(f"{r['cell']:<40} {r['budget_s']:>7.0f} {r['train_seconds']:>8.1f} {r['fit_wall_s']:>10.1f} "
              f"{r['scoring_s']:>7.1f}  {overrun(r['fit_wall_s'], budget)}")
    for r in rows:  # where each cell's time went (runs before the clock counted phases: nothing)
        phases = (r["budget_record"] or {}).get("phases", {})
        if phases:
            print(f"  {r['cell']}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()))
    worst = max(r["fit_wall_s"] for r in rows)
    print(f"worst cell {worst:.1f} s for a {budget:.0f} s budget ({overrun(worst, budget)}); "
          f"whole grid {wall:.0f} s; load average (1 min) during the run: {loads}")
    (args.out / "budget_overrun.json").write_text(json.dumps(
        {"budget_s": budget, "preset": args.preset, "grid_wall_s": round(wall, 1), "load": loads,
         "cells": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
