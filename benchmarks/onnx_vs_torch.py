"""ONNX Runtime vs eager PyTorch throughput on the same decoded test images, in the same process.

    flock /tmp/imgcls-bench.lock .venv/bin/python benchmarks/onnx_vs_torch.py runs/cnn \
        --test-dir data/fashion-mnist/test [--random-init tf_efficientnet_lite0:96 --limit 2000]

Every variant predicts the same uint8 images end to end (preprocessing included, as `imgcls
predict` does); the table shows img/s (best of --repeats after one warm-up), speed-up over eager
fp32, and how many argmax answers differ from eager fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of `repeats` calls after one warm-up, and the last output."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def random_init_run(spec: str, root: Path, labels: list[str]) -> Path:
    """A run folder around a random-init timm backbone (speed only: accuracy is meaningless)."""
    from deploy_support import write_run_folder
    from imgcls.models import create_model, get_spec

    name, side = spec.split(":")
    model_spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(labels), in_chans=3).eval()
    mean = list(model_spec.mean or (0.5, 0.5, 0.5))
    std = list(model_spec.std or (0.5, 0.5, 0.5))
    return write_run_folder(root / name, name, model, labels, in_chans=3, data_channels=1, data_size=(28, 28),
                            image_size=(int(side), int(side)), mean=mean, std=std)


def variants(run: Path, threads: int, batch_sizes: list[int], levels: list[str],
             int8: bool = False) -> list[tuple[str, object, int]]:
    """(label, predictor, batch size) for eager fp32, eager in the run's own precision, ONNX Runtime
    and, with `int8`, ONNX Runtime on the static int8 graph (quantised first when missing)."""
    from imgcls import fileio
    from imgcls.predict import OnnxPredictor, Predictor

    described = fileio.read_json(run / "run.json")
    run_precision = described.get("inference_precision", described.get("precision", "fp32"))
    out = []
    for batch in batch_sizes:
        out.append((f"torch eager fp32 b{batch}", Predictor.from_run(run, "cpu", "fp32"), batch))
        if run_precision == "bf16":
            out.append((f"torch eager bf16 b{batch}", Predictor.from_run(run, "cpu", "bf16"), batch))
        for level in levels:
            out.append((f"onnxruntime {level} b{batch}",
                        OnnxPredictor.from_run(run, threads=threads, optimization=level), batch))
        if int8:
            out.append((*int8_variant(run, threads, batch), batch))
    return out


def int8_variant(run: Path, threads: int, batch: int) -> tuple[str, object]:
    """The run's int8 graph; where export refuses it (accuracy loss over the bound), the same
    quantisation written to a temporary file, so its speed and accuracy are still measured."""
    from imgcls import fileio
    from imgcls.errors import ImgclsError
    from imgcls.export import (CALIBRATION_IMAGES, fresh_onnx, labelled_training_data, quantize_int8,
                               sidecar_path, split_indices)
    from imgcls.predict import OnnxPredictor
    from imgcls.train.run_folder import RunFolder

    try:
        return f"onnxruntime int8 b{batch}", OnnxPredictor.from_run_int8(run, threads=threads)
    except ImgclsError as exc:
        print(f"  int8 export refused ({exc}); measuring it anyway", flush=True)
    folder = RunFolder(run)
    data = labelled_training_data(folder)
    _, others = split_indices(folder, data, 0, CALIBRATION_IMAGES)
    path = Path(tempfile.mkdtemp()) / "refused.int8.onnx"
    quantize_int8(fresh_onnx(run), path, data.images[torch.from_numpy(others)])
    fileio.write_json(sidecar_path(path), fileio.read_json(sidecar_path(fresh_onnx(run))))
    return f"onnxruntime int8 (refused) b{batch}", OnnxPredictor.from_export(path, threads=threads)


def accuracy(predicted: np.ndarray, ids: list[str], key_csv: Path | None, predictor) -> float | None:
    """Accuracy against the answer key, when there is one (a sanity check that all engines agree on quality)."""
    if key_csv is None or not key_csv.is_file():
        return None
    import csv
    with open(key_csv, newline="") as fh:
        key = {row[0]: row[1] for row in list(csv.reader(fh))[1:]}
    labels = [str(x) for x in predictor.classes.decode(predicted)]
    hits = [key.get(i, key.get(Path(i).stem)) == label for i, label in zip(ids, labels)]
    return float(np.mean(hits))


def bench_run(run: Path, images: torch.Tensor, ids: list[str], args: argparse.Namespace) -> list[dict]:
    rows, reference, base_speed = [], None, None
    for label, predictor, batch in variants(run, args.threads, args.batch_sizes, args.levels, args.int8):
        seconds, proba = timed(lambda: predictor.predict_proba(images, batch), args.repeats)
        predicted = proba.argmax(1)
        if reference is None:
            reference, base_speed = predicted, len(images) / seconds
        speed = len(images) / seconds
        rows.append({"run": run.name, "variant": label, "img_s": speed, "x": speed / base_speed,
                     "differ": int((predicted != reference).sum()),
                     "acc": accuracy(predicted, ids, args.key, predictor)})
        print(f"  {label:<28} {speed:9.0f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="trained run folders")
    parser.add_argument("--test-dir", type=Path, default=Path("data/fashion-mnist/test"))
    parser.add_argument("--key", type=Path, help="answer key CSV (default: test_labels.csv beside --test-dir)")
    parser.add_argument("--random-init", action="append", default=[], help="MODEL:SIDE timm backbone, speed only")
    parser.add_argument("--limit", type=int, help="only the first N test images (for slow backbones)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--levels", nargs="+", default=["basic", "all"], help="ONNX Runtime graph optimisation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also the static int8 graph (imgcls export --int8)")
    args = parser.parse_args()
    args.key = args.key or args.test_dir.parent / "test_labels.csv"
    torch.set_num_threads(args.threads)

    from imgcls.engines import cpu_signature
    from imgcls.predict import Predictor

    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = list(args.runs)
        first = Predictor.from_run(runs[0], "cpu") if runs else None
        labels = list(first.classes.labels) if first else [str(i) for i in range(10)]
        runs += [random_init_run(spec, Path(tmp), labels) for spec in args.random_init]
        for run in runs:
            predictor = Predictor.from_run(run, "cpu")
            data = predictor.load(args.test_dir)
            images, ids = data.images[: args.limit], data.ids[: args.limit]
            print(f"{run}: {predictor.model_info['name']}, {len(images)} images, {args.threads} threads", flush=True)
            all_rows += bench_run(run, images, ids, args)
    print(f"\nCPU flags: {' '.join(cpu_signature(torch.device('cpu'))['flags'])}; "
          f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"\n| run | variant | img/s | vs eager fp32 | argmax differs | accuracy |\n|---|---|---:|---:|---:|---:|")
    for r in all_rows:
        acc = f"{r['acc']:.4f}" if r["acc"] is not None else "-"
        print(f"| {r['run']} | {r['variant']} | {r['img_s']:.0f} | {r['x']:.2f}x | {r['differ']} | {acc} |")


if __name__ == "__main__":
    main()
