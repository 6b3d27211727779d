"""Which of a run's first convolutions int8 needs in fp32: top-1 agreement with the fp32 graph when
each one alone is left in fp32, and when each one of the export's fp32 set is quantised back.

The export's tries keep the first k convolutions in fp32 (INT8_FP32_CONV_TRIES), by position. This
measures them one by one on the images `imgcls export --int8` uses (validation from split.json,
calibration from the training images), then times the smallest fp32 set that keeps --min-agreement
against the fp32 graph and against the export's largest try, in alternating rounds (int8_variants).

Usage: python benchmarks/int8_sensitivity.py RUN WORK_DIR [--candidates 8] [--batch-sizes 64,512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from int8_variants import add_sample_arguments, alternate_speeds, int8_sample  # noqa: E402

from imgcls.export import (INT8_FP32_CONV_TRIES, MIN_AGREEMENT, _Calibration, int8_settings,  # noqa: E402
                           onnx_session, run_onnx)
from imgcls.runtime import cpu_has_vnni  # noqa: E402


class Quantiser:
    """Quantises the prepared graph with a given set of convolutions (by index) in fp32 and scores it."""

    def __init__(self, prepared: Path, work: Path, calibration: torch.Tensor, images: torch.Tensor,
                 targets, reference_labels):
        self.prepared, self.work, self.calibration = prepared, work, calibration
        self.images, self.targets, self.reference = images, targets, reference_labels
        self.convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
        self.settings = int8_settings(cpu_has_vnni())

    def graph(self, fp32: tuple[int, ...]) -> Path:
        from onnxruntime.quantization import quantize_static

        out = self.work / f"fp32-{'-'.join(map(str, fp32)) or 'none'}.onnx"
        if not out.exists():
            quantize_static(str(self.prepared), str(out), _Calibration(self.calibration),
                            nodes_to_exclude=[self.convs[i] for i in fp32], **self.settings)
        return out

    def score(self, fp32: tuple[int, ...]) -> tuple[float, float]:
        """(accuracy, top-1 agreement with fp32) of the graph with `fp32` left in fp32."""
        labels = run_onnx(onnx_session(self.graph(fp32)), self.images, 64, 0).argmax(1)
        return float((labels == self.targets).mean()), float((labels == self.reference).mean())


def report(name: str, fp32: tuple[int, ...], scores: tuple[float, float]) -> None:
    print(f"{name}: fp32 convs {list(fp32)}: accuracy {scores[0]:.4f}, agreement {scores[1]:.4f}", flush=True)


def smallest_agreeing_set(quantiser: Quantiser, full: tuple[int, ...], min_agreement: float) -> tuple[int, ...]:
    """Greedy: from the export's largest fp32 set, quantise back each convolution in turn, from the
    first, whenever the graph without it still keeps `min_agreement`."""
    kept = full
    for index in full:
        trial = tuple(i for i in kept if i != index)
        scores = quantiser.score(trial)
        report(f"greedy, conv {index} quantised back", trial, scores)
        if scores[1] >= min_agreement:
            kept = trial
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sample_arguments(parser)
    parser.add_argument("--candidates", type=int, default=8, help="how many of the first convolutions to try alone")
    parser.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    parser.add_argument("--batch-sizes", default="64,512")
    args = parser.parse_args()
    sample = int8_sample(args)
    images, fp32 = sample.images, sample.fp32
    quantiser = Quantiser(sample.prepared, args.work, sample.calibration, images, sample.targets,
                          sample.reference.argmax(1))
    report("whole graph int8", (), quantiser.score(()))
    for index in range(args.candidates):
        report(f"conv {index} alone in fp32", (index,), quantiser.score((index,)))
    largest = tuple(range(max(INT8_FP32_CONV_TRIES)))
    report("the export's largest try", largest, quantiser.score(largest))
    kept = smallest_agreeing_set(quantiser, largest, args.min_agreement)
    report("smallest set found", kept, quantiser.score(kept))
    fp32_session = onnx_session(fp32)
    for name, fp32_set in (("export's largest try", largest), ("smallest set found", kept)):
        session = onnx_session(quantiser.graph(fp32_set))
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            base, speed = alternate_speeds(fp32_session, session, images, batch)
            print(f"{name} {list(fp32_set)}, batch {batch}: {speed:.0f} vs fp32 {base:.0f} img/s = "
                  f"{speed / base:.2f}x", flush=True)


if __name__ == "__main__":
    main()
