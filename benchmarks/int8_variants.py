"""int8 quantisation variants of a run's ONNX graph, side by side: validation accuracy against the
fp32 graph, top-1 agreement with it, and images/s (batch 64, one pass over 512 images).

Variants: the export's recipe (static QDQ, per-channel 7-bit weights, MinMax calibration), the
same calibrated by percentile or by entropy, and the recipe with the depthwise convolutions or the
first convolution left in fp32. Validation and calibration images are drawn as
`imgcls export --int8` draws them (validation from split.json's validation images, calibration
from the training images).

Usage: python benchmarks/int8_variants.py RUN WORK_DIR [--validation 2000] [--calibration 256]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgcls.export import (_Calibration, fresh_onnx, int8_settings, labelled_training_data,  # noqa: E402
                           onnx_session, run_onnx, split_indices)
from imgcls.train.run_folder import RunFolder  # noqa: E402


def images_per_s(path: Path, images: torch.Tensor) -> float:
    session = onnx_session(path)
    run_onnx(session, images[:64], 64, 0)  # warm-up
    t = time.perf_counter()
    run_onnx(session, images[:512], 64, 0)
    return min(512, len(images)) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--validation", type=int, default=2000)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args()
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    warnings.simplefilter("ignore")
    folder = RunFolder(args.run)
    args.work.mkdir(parents=True, exist_ok=True)
    data = labelled_training_data(folder)
    val, others = (torch.from_numpy(i) for i in split_indices(folder, data, args.validation, args.calibration))
    images, targets, calibration = data.source.gather(val), data.targets[val].numpy(), data.source.gather(others)
    fp32 = fresh_onnx(folder.path)
    prepared = args.work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))
    reference = run_onnx(onnx_session(fp32), images, 64, 0)
    accuracy = (reference.argmax(1) == targets).mean()
    print(f"fp32: accuracy {accuracy:.4f} on {len(targets)} validation images, {images_per_s(fp32, images):.1f} img/s")
    convs = [n for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    variants = {"export recipe (MinMax)": {}, "percentile": {"calibrate_method": CalibrationMethod.Percentile},
                "entropy": {"calibrate_method": CalibrationMethod.Entropy},
                "depthwise convs in fp32": {"nodes_to_exclude": depthwise},
                "first conv in fp32": {"nodes_to_exclude": [convs[0].name]}}
    for name, options in variants.items():
        out = args.work / f"int8-{len(options)}-{abs(hash(name)) % 10**6}.onnx"
        quantize_static(str(prepared), str(out), _Calibration(calibration), **{**int8_settings(), **options})
        logits = run_onnx(onnx_session(out), images, 64, 0)
        print(f"{name}: accuracy {(logits.argmax(1) == targets).mean():.4f}, top-1 agreement with fp32 "
              f"{(logits.argmax(1) == reference.argmax(1)).mean():.4f}, {images_per_s(out, images):.1f} img/s",
              flush=True)


if __name__ == "__main__":
    main()
