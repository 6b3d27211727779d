"""int8 quantisation variants of a run's ONNX graph, side by side: validation accuracy against the
fp32 graph, top-1 agreement with it, and images/s against the fp32 graph's at each --batch-sizes
(medians of 5 rounds timing one pass of each in turn, over 512 images; 64 at batch 1).

Variants: the export's recipe (static QDQ, per-channel weights, ReLU/ReLU6 quantised with their
convolutions, MinMax calibration; 8-bit weights where the CPU has VNNI, 7-bit elsewhere), the
other weight range, the recipe without the activations (only convolutions and the classifier, as
the export did before), calibrated by percentile, with the first convolutions left in fp32 as each
of the export's later tries does (INT8_FP32_CONV_TRIES), and with the depthwise convolutions in
fp32. Validation and calibration images are drawn as `imgcls export --int8` draws them
(validation from split.json's validation images, calibration from the training images).

Usage: python benchmarks/int8_variants.py RUN WORK_DIR [--validation 2000] [--calibration 256]
       [--batch-sizes 1,64,512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgcls.export import (INT8_FP32_CONV_TRIES, _Calibration, fresh_onnx, int8_settings,  # noqa: E402
                           labelled_training_data, onnx_session, run_onnx, split_indices)
from imgcls.runtime import cpu_has_vnni, cpu_kind  # noqa: E402
from imgcls.train.run_folder import RunFolder  # noqa: E402

ROUNDS = 5


def alternate_speeds(fp32, variant, images: torch.Tensor, batch: int) -> tuple[float, float]:
    """(fp32 img/s, variant img/s) at `batch`: medians of ROUNDS rounds that time one pass of each
    in turn over up to 512 images, so both see the same machine (its speed drifts between minutes)."""
    sample = images[:512] if batch > 1 else images[:64]
    for session in (fp32, variant):
        run_onnx(session, sample[:batch], batch, 0)  # warm-up
    seconds = {"fp32": [], "variant": []}
    for _ in range(ROUNDS):
        for name, session in (("fp32", fp32), ("variant", variant)):
            start = time.perf_counter()
            run_onnx(session, sample, batch, 0)
            seconds[name].append(time.perf_counter() - start)
    return len(sample) / statistics.median(seconds["fp32"]), len(sample) / statistics.median(seconds["variant"])


@dataclass
class Int8Sample:
    """What both int8 benchmarks start from, drawn as `imgcls export --int8` draws it."""
    images: torch.Tensor  # validation images (split.json's)
    targets: np.ndarray
    calibration: torch.Tensor  # training images
    fp32: Path  # the run's fp32 ONNX graph
    prepared: Path  # the same after quant_pre_process, what quantize_static takes
    reference: np.ndarray  # the fp32 graph's logits of `images`


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--validation", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=256)


def int8_sample(args: argparse.Namespace) -> Int8Sample:
    """Draw the images, prepare the graph in WORK, and print the CPU and fp32's accuracy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings.simplefilter("ignore")
    folder = RunFolder(args.run)
    args.work.mkdir(parents=True, exist_ok=True)
    data = labelled_training_data(folder)
    val, others = (torch.from_numpy(i) for i in split_indices(folder, data, args.validation, args.calibration))
    images, targets = data.source.gather(val), data.targets[val].numpy()
    fp32 = fresh_onnx(folder.path)
    prepared = args.work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))
    reference = run_onnx(onnx_session(fp32), images, 64, 0)
    print(f"CPU: {cpu_kind()}")
    print(f"fp32: accuracy {(reference.argmax(1) == targets).mean():.4f} on {len(targets)} validation images")
    return Int8Sample(images, targets, data.source.gather(others), fp32, prepared, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_arguments(parser)
    parser.add_argument("--batch-sizes", default="64", help="comma-separated batch sizes the speeds are timed at")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    sample = int8_sample(args)
    images, targets, calibration, fp32, prepared = (sample.images, sample.targets, sample.calibration,
                                                   sample.fp32, sample.prepared)
    reference = sample.reference
    vnni = cpu_has_vnni()
    fp32_session = onnx_session(fp32)
    convs = [n for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    recipe, other = int8_settings(vnni), int8_settings(not vnni)
    variants = {f"export recipe ({8 if vnni else 7}-bit weights)": recipe,
                f"{7 if vnni else 8}-bit weights": other,
                "convolutions and classifier only": {**recipe, "op_types_to_quantize": ["Conv", "Gemm", "MatMul"]},
                "percentile": {**recipe, "calibrate_method": CalibrationMethod.Percentile},
                **{f"first {k} convs in fp32 (export's try {i + 1})":
                   {**recipe, "nodes_to_exclude": [n.name for n in convs[:k]]}
                   for i, k in enumerate(INT8_FP32_CONV_TRIES) if k},
                "depthwise convs in fp32": {**recipe, "nodes_to_exclude": depthwise}}
    for i, (name, options) in enumerate(variants.items()):
        out = args.work / f"int8-variant-{i}.onnx"
        quantize_static(str(prepared), str(out), _Calibration(calibration), **options)
        session = onnx_session(out)
        logits = run_onnx(session, images, 64, 0)
        speeds = []
        for batch in batch_sizes:
            fp32_speed, speed = alternate_speeds(fp32_session, session, images, batch)
            speeds.append(f"batch {batch}: {speed:.0f} vs fp32 {fp32_speed:.0f} img/s = {speed / fp32_speed:.2f}x")
        print(f"{name}: accuracy {(logits.argmax(1) == targets).mean():.4f}, top-1 agreement with fp32 "
              f"{(logits.argmax(1) == reference.argmax(1)).mean():.4f}; {'; '.join(speeds)}", flush=True)


if __name__ == "__main__":
    main()
