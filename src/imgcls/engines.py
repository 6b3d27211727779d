"""Which engine runs a run's model: `--engine auto` measures the candidates on this machine and keeps
the fastest whose predictions match eager fp32 within the tolerance.

Which engine is fastest depends on the CPU (bf16 autocast wins only with AVX512-BF16 / AMX; ONNX
Runtime's int8 kernels gain most with VNNI) and on the model, so it is measured rather than assumed:
a timed pass over a small labelled sample, recorded in the run folder's engine.json with the CPU
flags it was measured on, and measured again when the flags, the weights or the thread count differ.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgcls import fileio
from imgcls.errors import ImgclsError, OptionError
from imgcls.export import GRAPH_REVISION, MIN_AGREEMENT, labelled_training_data, split_indices
from imgcls.runtime import cpu_has_fast_bf16, cpu_info, pick_device
from imgcls.train.run_folder import RunFolder

ENGINES = ("auto", "torch", "torch-bf16", "onnx", "onnx-int8")
REFERENCE = "torch"  # eager fp32: the predictions every other engine is checked against
LOSSY = ("torch-bf16", "onnx-int8")  # engines whose predictions may differ from fp32's
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8")  # the ones that change which kernels are fast
SAMPLE_IMAGES = 512  # one image is 0.2 points: fine enough for the 0.5-point bound
# Timed at the batch sizes the engine will run: `imgcls predict`'s 512 (predict_folder), or a
# server's 1 and --max-batch. Engines rank differently by batch size: on Lite0 eager bf16 was as
# fast as ONNX at 64 and 38% slower at 512, and 10x slower one image at a time.
PREDICT_BATCHES = (512,)
SMALL_BATCH_SAMPLE = 64  # images timed at the small batch sizes (one at a time, 512 would take long)
TIMING_BUDGET_S = 1.0  # fast engines repeat the pass up to this long (or MAX_PASSES), for a steadier figure
MAX_PASSES = 5
# ONNX Runtime runs a new batch shape at full speed from its third call: Lite0's int8 graph at
# batch 512 ran at 202 img/s on the second call and 779-868 after.
WARM_UP_CALLS = 2

Factory = Callable[[], object]  # builds a predictor (predict_proba(images, batch_size))


@dataclass(frozen=True)
class Tolerance:
    """How close to eager fp32 an engine's predictions must be on the check sample to be chosen."""

    max_accuracy_loss: float = 0.005
    """Accuracy on the labelled sample may be at most this far below eager fp32's (0.005: 0.5 points)."""
    min_agreement: float = MIN_AGREEMENT
    """Top-1 labels equal to eager fp32's on at least this fraction of the sample."""


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise OptionError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")
    return name


def cpu_signature(device: torch.device) -> dict:
    """The processor an engine choice holds for: model name and the flags that pick kernels."""
    model, flags = cpu_info()
    signature = {"model": model, "flags": [f for f in CPU_FLAGS if f in flags]}
    if device.type == "cuda":
        signature["gpu"] = torch.cuda.get_device_name(device)
    return signature


def candidates(device: torch.device, labelled: bool) -> tuple[list[str], dict[str, str]]:
    """(engines to measure, {engine: why it is not measured}) for this device and check sample."""
    names, skipped = [REFERENCE], {}
    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    if fast_bf16:
        names.append("torch-bf16")
    else:
        skipped["torch-bf16"] = "no fast bf16 on this processor (AVX512-BF16 / AMX)"
    if device.type == "cuda":
        skipped.update(dict.fromkeys(("onnx", "onnx-int8"), "ONNX Runtime runs on the CPU; the model is on the GPU"))
    elif importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        skipped.update(dict.fromkeys(("onnx", "onnx-int8"), "onnx / onnxruntime not installed (imgcls[export])"))
    else:
        names += ["onnx", "onnx-int8"]
    if not labelled:
        for name in [n for n in names if n in LOSSY]:
            names.remove(name)
            skipped[name] = "the run's training data is gone: no labelled sample to bound its accuracy loss"
    return names, skipped


def check_sample(folder: RunFolder, size: int = SAMPLE_IMAGES) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(images, targets or None, what they are): the run's validation split, topped up with training
    images when smaller than `size`; seeded random pixels when the training data is gone."""
    data = labelled_training_data(folder)
    if data is None:
        info = folder.model_info()
        shape = (min(size, 64), *info["data_size"], info["data_channels"])
        pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return pixels, None, "random pixels (training data not found)"
    val, rest = split_indices(folder, data, size, size)
    chosen = np.sort(np.concatenate([val, rest[: size - len(val)]]))
    source = "validation split" if len(val) == len(chosen) else \
        f"validation split ({len(val)}) + training images ({len(chosen) - len(val)})"
    index = torch.from_numpy(chosen)
    return data.source.gather(index), data.targets[index], source


def timed_pass(predictor, images: torch.Tensor, clock: Callable[[], float], batch_size: int = PREDICT_BATCHES[0],
               budget_s: float = TIMING_BUDGET_S) -> tuple[float, np.ndarray]:
    """(images/s, probabilities) at `batch_size`: WARM_UP_CALLS warm-up batches, then whole passes
    over the sample until the budget or MAX_PASSES is reached."""
    for _ in range(WARM_UP_CALLS):
        predictor.predict_proba(images[:batch_size], batch_size)
    passes, elapsed, proba = 0, 0.0, None
    while passes < MAX_PASSES and (passes == 0 or elapsed < budget_s):
        start = clock()
        proba = predictor.predict_proba(images, batch_size)
        elapsed += clock() - start
        passes += 1
    return passes * len(images) / max(elapsed, 1e-9), proba


def timed_passes(predictor, images: torch.Tensor, clock: Callable[[], float],
                 batch_sizes: tuple[int, ...]) -> tuple[float, dict[int, float], np.ndarray]:
    """(combined images/s, {batch size: images/s}, probabilities of the whole sample at the largest
    batch). Combined: the harmonic mean, i.e. the speed over equal numbers of images at each batch
    size, so an engine fast in big batches but slow one image at a time (eager bf16) does not win a
    server's choice on its batched speed alone. Small batches time a slice of the sample."""
    speeds, proba = {}, None
    for batch_size in sorted(batch_sizes, reverse=True):
        sample = images if batch_size == max(batch_sizes) else images[:SMALL_BATCH_SAMPLE]
        speeds[batch_size], out = timed_pass(predictor, sample, clock, batch_size)
        proba = out if proba is None else proba
    combined = len(speeds) / sum(1 / max(v, 1e-9) for v in speeds.values())
    return combined, dict(sorted(speeds.items())), proba


def judge(proba: np.ndarray, reference: np.ndarray, targets: torch.Tensor | None, tolerance: Tolerance) -> dict:
    """Agreement with eager fp32 and accuracy lost on the sample, and whether both are in tolerance."""
    labels, reference_labels = proba.argmax(1), reference.argmax(1)
    agreement = float((labels == reference_labels).mean())
    verdict = {"agreement": round(agreement, 4)}
    problems = [f"agreement {agreement:.1%} < {tolerance.min_agreement:.0%}"] if agreement < tolerance.min_agreement else []
    if targets is not None:
        truth = targets.numpy()
        accuracy, reference_accuracy = float((labels == truth).mean()), float((reference_labels == truth).mean())
        loss = reference_accuracy - accuracy
        verdict.update(accuracy=round(accuracy, 4), accuracy_loss_points=round(100 * loss, 2))
        if loss > tolerance.max_accuracy_loss + 1e-12:
            problems.append(f"loses {100 * loss:.2f} accuracy points > {100 * tolerance.max_accuracy_loss:g}")
    verdict["passed"] = not problems
    if problems:
        verdict["reason"] = "; ".join(problems)
    return verdict


def measure(factories: dict[str, Factory], names: list[str], images: torch.Tensor, targets: torch.Tensor | None,
            tolerance: Tolerance, clock: Callable[[], float],
            batch_sizes: tuple[int, ...] = PREDICT_BATCHES) -> tuple[dict, str, object]:
    """({engine: speed and verdict}, the fastest passing engine, its predictor): eager fp32 first, as
    the reference, then every other candidate; one that cannot be built is refused with the reason."""
    measured, reference, best = {}, None, None
    for name in names:
        try:
            predictor = factories[name]()
        except ImgclsError as exc:
            measured[name] = {"passed": False, "reason": str(exc)}
            continue
        speed, by_batch, proba = timed_passes(predictor, images, clock, batch_sizes)
        reference = proba if reference is None else reference
        measured[name] = {"images_per_s": round(speed, 1), **judge(proba, reference, targets, tolerance)}
        if len(by_batch) > 1:
            measured[name]["images_per_s_by_batch"] = {str(b): round(v, 1) for b, v in by_batch.items()}
        if measured[name]["passed"] and (best is None or speed > measured[best[0]]["images_per_s"]):
            best = (name, predictor)
    return measured, best[0], best[1]


def describe(record: dict, path: Path, reused: bool) -> str:
    """One line: the engine, every measured speed or refusal, and where the record lives."""
    parts = []
    for name, m in record["measured"].items():
        speed = f" {m['images_per_s']:,.0f} img/s" if "images_per_s" in m else ""
        if "images_per_s_by_batch" in m:
            by_batch = m["images_per_s_by_batch"]
            speed += f" ({' / '.join(f'{v:,.0f}' for v in by_batch.values())} at batch {' / '.join(by_batch)})"
        parts.append(f"{name}{speed}" + ("" if m["passed"] else f" refused ({m['reason']})"))
    parts += [f"{name} skipped ({why})" for name, why in record["skipped"].items()]
    flags = " ".join(record["cpu"]["flags"]) or "none of " + " ".join(CPU_FLAGS)
    how = "recorded" if reused else "measured"
    return (f"engine auto: {record['engine']} ({how} on {record['cpu']['model'] or 'this CPU'}, flags {flags}; "
            f"{'; '.join(parts)}; {path})")


def recorded_choice(path: Path, key: dict) -> dict | None:
    """The record in engine.json when it was measured under the same key (CPU, weights, threads)."""
    try:
        record = fileio.read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return None
    return record if record.get("engine") in ENGINES else None


def auto_engine(run_dir, factories: dict[str, Factory], device: str = "auto", tolerance: Tolerance = Tolerance(),
                log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                names: list[str] | None = None, serving_batch: int | None = None) -> tuple[object, dict]:
    """(predictor, record) for the fastest engine within tolerance, from engine.json when it was
    measured on this CPU with these weights and threads, else measured now and recorded there.
    `serving_batch`: choose for a server whose batches run from 1 to that many images (timed at
    both ends, recorded in engine.serve.json) rather than for `imgcls predict`'s large batches.
    `names` overrides the candidate list (tests inject engines)."""
    folder = RunFolder(run_dir)
    folder.require_finished()
    dev = pick_device(device)
    key = {"cpu": cpu_signature(dev), "weights_sha256": folder.weights_sha256(), "threads": torch.get_num_threads(),
           "tolerance": asdict(tolerance), "graph_revision": GRAPH_REVISION}
    batch_sizes = PREDICT_BATCHES if serving_batch is None else tuple(sorted({1, serving_batch}))
    key["batch_sizes"] = list(batch_sizes)
    path = folder / (RunFolder.ENGINE if serving_batch is None else RunFolder.ENGINE_SERVE)
    record = recorded_choice(path, key)
    if record is not None and record["engine"] in factories:
        if log:
            log(describe(record, path, reused=True))
        return factories[record["engine"]](), record
    images, targets, source = check_sample(folder)
    found, skipped = candidates(dev, targets is not None)
    names = names or found
    measured, chosen, predictor = measure(factories, names, images, targets, tolerance, clock, batch_sizes)
    record = {"engine": chosen, **key, "measured": measured, "skipped": {k: v for k, v in skipped.items() if k not in names},
              "sample": {"images": len(images), "source": source,
                         "images_at_small_batches": min(len(images), SMALL_BATCH_SAMPLE)},
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    fileio.write_json(path, record)
    if log:
        log(describe(record, path, reused=False))
    return predictor, record
