"""report.html: self-contained, opens in headless Chromium without console errors, every figure renders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import HANG_S, make_csv_dataset
from imgcls.compare import ADVICE_FILE, Grid, run_compare

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
GRID = Grid(pairs=(("scratch-cnn-tiny", "scratch"),), per_class=(3, None), seeds=(0, 1), epochs=2,
            val_fraction=0.2, train_overrides={"batch_size": 16})
FIGURES = 5  # data efficiency, confusion matrix, per-class F1, confident mistakes, learning curves


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = make_csv_dataset(root / "ds", n_per_class=10, n_test=24)
    out = root / "cmp"
    out.mkdir()
    # The advisor has its own tests; a recorded verdict is enough to check how the report shows it.
    (out / ADVICE_FILE).write_text(json.dumps({"scenario": 2, "strategy": "partial",
                                               "summary": "scenario 2 (small data, low similarity)"}))
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: conftest's per-test cache isolation cannot apply
        mp.setenv("IMGCLS_HOME", str(root / "home"))
        _, path = run_compare(data / "train", data / "test", out, GRID, data / "test_labels.csv",
                              log=lambda _: None)
    return path


def test_report_is_self_contained(report: Path) -> None:
    page = report.read_text()
    sources = re.findall(r"<img src='([^']*)'", page)
    assert len(sources) == FIGURES and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    assert "scenario 2" in page and "differs from the best cell's strategy" in page
    assert page.count("<tr>") == 1 + len(GRID.cells())  # header + one row per run


def test_report_renders_in_chromium(report: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(HANG_S * 1000)  # a busy machine may take minutes; only a hang waits longer
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        page.screenshot(path="/tmp/report.png", full_page=True)
        browser.close()
    assert errors == []
    assert len(widths) == FIGURES and all(w > 100 for w in widths)
    assert {"Verdict", "Leaderboard", "Data efficiency", "Learning curves"} <= set(headings)
    assert any(h.startswith("Most confident mistakes") for h in headings)
