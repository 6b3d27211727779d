"""report.html for a compare folder: one self-contained file (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from imgcls import fileio  # noqa: E402
from imgcls.data import load_dataset  # noqa: E402
from imgcls.errors import ImgclsError  # noqa: E402
from imgcls.train.run_folder import RunFolder  # noqa: E402

REPORT_FILE = "report.html"
GALLERY_SIZE = 16


def png_data_uri(fig) -> str:
    """Render a figure to an embeddable data URI and free it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def label(row: dict) -> str:
    return f"{row['model']} / {row['strategy']}"


def learning_curves(out: Path, rows: list[dict]):
    """One small panel per run: train and validation accuracy per epoch."""
    cols = min(4, len(rows))
    n_rows = -(-len(rows) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.4 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        history = RunFolder(out / row["run"]).read_metrics()
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_acc"] for h in history], "o-", ms=3, label="train")
        ax.plot(epochs, [h["val_acc"] for h in history], "s-", ms=3, label="validation")
        ax.set_title(f"{label(row)}\n{row['per_class']}/class, seed {row['seed']}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("accuracy", fontsize=9)
    fig.tight_layout()
    return fig


def efficiency_points(rows: list[dict], classes: int) -> dict[str, list[tuple[float, float, float]]]:
    """label -> [(labelled images per class, mean test accuracy, std over seeds)], sorted by size."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        if row["per_class"] != "all" and not str(row["per_class"]).isdigit():
            continue  # an ensemble of members trained on different sizes has no one size
        per_class = int(row["train_images"]) / classes if row["per_class"] == "all" else float(row["per_class"])
        groups[(label(row), per_class)].append(float(row["test_accuracy"]))
    curves: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for (name, size), accs in sorted(groups.items(), key=lambda kv: kv[0][1]):
        curves[name].append((size, float(np.mean(accs)), float(np.std(accs))))
    return dict(curves)


def data_efficiency(rows: list[dict], classes: int):
    """Test accuracy vs labelled images per class: scratch against every transfer strategy."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in efficiency_points(rows, classes).items():
        x, y, err = zip(*points)
        style = "--" if name.endswith("/ scratch") else "-"
        ax.errorbar(x, y, yerr=err, fmt="o" + style, capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class")
    ax.set_ylabel("test accuracy")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title("test accuracy vs labelled images per class", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_class_f1(ev: dict):
    names = [c["class"] for c in ev["per_class"]]
    f1 = [c["f1"] for c in ev["per_class"]]
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(names) + 1))
    ax.barh(range(len(names)), f1, color="#4477aa")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    for i, v in enumerate(f1):
        ax.text(min(v, 0.92) + 0.01, i, f"{v:.3f}", va="center", fontsize=7)
    ax.set_title("per-class F1 of the best model")
    fig.tight_layout()
    return fig


def confident_mistakes(run_dir: Path, test_dir: str, names: list[str]):
    """The wrong predictions the best model was surest about, with true and predicted labels."""
    folder = RunFolder(run_dir)
    proba, index, y_true = folder.read_test_proba()
    pred, conf = proba.argmax(1), proba.max(1)
    wrong = np.flatnonzero(pred != y_true)
    if not len(wrong):
        return None
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_SIZE]
    info = folder.model_info()
    data = load_dataset(test_dir, require_labels=False, channels=info["data_channels"],
                        size=tuple(info["data_size"]))
    cols = min(8, len(worst))
    fig, axes = plt.subplots(-(-len(worst) // cols), cols, figsize=(1.6 * cols, 2.0 * -(-len(worst) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, worst):
        image = data.source.gather([int(index[k])])[0].numpy()
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
        ax.set_title(f"true {names[y_true[k]]}\npred {names[pred[k]]} {conf[k]:.0%}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def kind_of(row: dict) -> str:
    """What a leaderboard row is in the story: scratch, transfer, a taught student or an ensemble
    (compare.leaderboard's `kind`; a leaderboard written before that column: scratch or transfer)."""
    return row.get("kind") or ("scratch" if label(row).endswith("/ scratch") else "transfer")


def _size_order(size) -> tuple:
    """10, 100, ..., all, then ensembles of members with mixed sizes."""
    return (0, float(size)) if str(size).isdigit() else (1 if size == "all" else 2, 0.0)


def _verdict(gap: float, yes: str, no: str) -> str:
    return f"{yes if gap > 0 else no} ({gap:+.1%})"


def grid_findings(rows: list[dict]) -> list[str]:
    """Per labelled-set size: the best scratch cell against the best transfer cell, and the best
    student against both (means over seeds); the best ensemble is listed too."""
    by_size: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kinds = {label(row): kind_of(row) for row in rows}
    for row in rows:
        by_size[row["per_class"]][label(row)].append(float(row["test_accuracy"]))
    lines = []
    for size in sorted(by_size, key=_size_order):
        means = {name: float(np.mean(v)) for name, v in by_size[size].items()}
        best = {}
        for kind in ("scratch", "transfer", "student", "ensemble"):
            of_kind = {k: v for k, v in means.items() if kinds[k] == kind}
            if of_kind:
                best[kind] = max(of_kind, key=of_kind.get)
        verdicts = []
        if "scratch" in best and "transfer" in best:
            gap = means[best["transfer"]] - means[best["scratch"]]
            verdicts.append(_verdict(gap, "transfer helps", "transfer does not help"))
        for other in ("scratch", "transfer"):
            if "student" in best and other in best:
                gap = means[best["student"]] - means[best[other]]
                verdicts.append(_verdict(gap, f"the student beats the best {other}",
                                         f"the student does not beat the best {other}"))
        found = ", ".join(f"best {kind} {means[name]:.1%} ({name})" for kind, name in best.items())
        lines.append(f"{size} per class: {found}" + (f" -> {'; '.join(verdicts)}" if verdicts else ""))
    return lines


def verdict_html(advice: dict | None, rows: list[dict]) -> str:
    """The advisor's measured recommendation next to what the grid found."""
    best = rows[0]
    found = grid_findings(rows)
    lines = [f"<li>{html.escape(x)}</li>" for x in found]
    grid_side = (f"<p>Best cell overall: <b>{html.escape(label(best))}</b> with {best['per_class']} labelled "
                 f"images per class, test accuracy {float(best['test_accuracy']):.4f}.</p><ul>{''.join(lines)}</ul>")
    if not advice:
        advisor = "<p>No advisor run recorded (run <code>imgcls advise TRAIN_DIR</code>).</p>"
    else:
        agree = advice["strategy"] == best["strategy"]
        advisor = (f"<p>Scenario <b>{advice['scenario']}</b>, strategy <b>{html.escape(advice['strategy'])}</b> "
                   f"({'matches' if agree else 'differs from'} the best cell's strategy "
                   f"<b>{html.escape(best['strategy'])}</b>).</p>"
                   f"<pre>{html.escape(advice.get('summary', ''))}</pre>")
    return (f"<div class='pair'><div><h3>Advisor (measured before training)</h3>{advisor}</div>"
            f"<div><h3>What the grid found</h3>{grid_side}</div></div>")


def leaderboard_html(rows: list[dict]) -> str:
    head = ["#", "model", "strategy", "labelled/class", "seed", "test acc", "macro-F1", "train s",
            "pipeline s", "train img/s", "predict img/s", "parameters", "trainable", "time budget"]
    body = []
    for r in rows:
        cells = [r["rank"], r["model"], r["strategy"], r["per_class"], r["seed"],
                 f"{float(r['test_accuracy']):.4f}", f"{float(r['macro_f1']):.4f}",
                 number_or_dash(r["train_seconds"]), number_or_dash(r.get("pipeline_seconds")),
                 number_or_dash(r["images_per_s"]), number_or_dash(r.get("predict_images_per_s")),
                 f"{int(r['parameters']):,}",
                 f"{int(r['trainable_parameters']):,}",
                 f"cut short: {r['cut_short']}" if r.get("cut_short") else "not cut"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def number_or_dash(value, fmt: str = ".0f") -> str:
    """A leaderboard number as text; '-' where a row has none (an ensemble's training throughput,
    a leaderboard written before the column existed)."""
    return "-" if value in (None, "") else format(float(value), fmt)


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}tbody tr:first-child{background:#e8f3e8}img{max-width:100%;display:block;margin:.5em 0}
pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;font-size:12px}.pair{display:flex;gap:2em}
.pair>div{flex:1}h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def figure(uri: str, alt: str) -> str:
    return f"<img src='{uri}' alt='{html.escape(alt)}'>"


def write_report(out: str | os.PathLike, rows: list[dict], advice: dict | None = None) -> Path:
    """Build report.html in the compare folder from its leaderboard rows and run folders."""
    out = Path(out)
    if not rows:
        raise ImgclsError(f"{out}: no finished cells to report on")
    grid = fileio.read_json(out / "compare.json")
    best = RunFolder(out / rows[0]["run"])
    ev = best.read_eval()
    names = [c["class"] for c in ev["per_class"]]
    parts = [f"<h1>imgcls comparison: {html.escape(grid['train_dir'])}</h1>",
             f"<p>{len(rows)} runs, same validation rule and the same {ev['count']} test images "
             f"({html.escape(grid['test_dir'])}).</p>",
             "<h2>Verdict</h2>", verdict_html(advice, rows),
             "<h2>Leaderboard</h2>", leaderboard_html(rows),
             "<h2>Data efficiency</h2>", figure(png_data_uri(data_efficiency(rows, len(names))), "data efficiency"),
             f"<h2>Best model: {html.escape(rows[0]['run'])}</h2>",
             figure(file_data_uri(best.confusion_png), "confusion matrix"),
             figure(png_data_uri(per_class_f1(ev)), "per-class F1")]
    mistakes = confident_mistakes(best.path, grid["test_dir"], names)
    parts += ["<h2>Most confident mistakes of the best model</h2>",
              figure(png_data_uri(mistakes), "confident mistakes") if mistakes else "<p>No mistakes.</p>",
              "<h2>Learning curves</h2>", figure(png_data_uri(learning_curves(out, rows)), "learning curves")]
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>imgcls comparison</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    fileio.write_text(out / REPORT_FILE, page)
    return out / REPORT_FILE
