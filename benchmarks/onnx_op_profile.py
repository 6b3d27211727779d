"""Where ONNX Runtime spends a forward pass: a run's fp32 and int8 graphs profiled by operator type.

    python benchmarks/onnx_op_profile.py RUN [--batch-sizes 1,64] [--threads 1] [--images 256]

For each graph and batch size: ONNX Runtime's own profiler (SessionOptions.enable_profiling) over
one pass of the run's validation images after a warm-up pass; per operator type the time a pass
spends in its kernels, per image, and its share; and what `session.run` takes beyond its kernels
(the executor's own work between nodes: scheduling, allocation, the Python binding). The graphs
are the run's exports (`imgcls export RUN --int8` writes the int8 one; quantised first when
missing), so the profile is of what `imgcls predict` and `imgcls serve` run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from imgcls.export import fresh_onnx, labelled_training_data, onnx_session, run_onnx, split_indices  # noqa: E402
from imgcls.predict import OnnxPredictor  # noqa: E402
from imgcls.runtime import cpu_kind  # noqa: E402
from imgcls.train.run_folder import RunFolder  # noqa: E402


def timed_pass(session, images: np.ndarray, batch: int) -> float:
    """Seconds for one pass of `images` in batches of `batch`, after a warm-up pass (first-run
    allocations, kernel choice)."""
    run_onnx(session, images, batch, 0)
    started = time.perf_counter()
    run_onnx(session, images, batch, 0)
    return time.perf_counter() - started


def profile(path: Path, images: np.ndarray, batch: int, threads: int) -> dict:
    """Kernel microseconds per image by operator type, session.run's microseconds per image with the
    profiler on, wall microseconds per image with it off, and the optimised graph's node count."""
    wall = timed_pass(onnx_session(path, threads), images, batch)
    with tempfile.TemporaryDirectory() as trace_dir:
        session = onnx_session(path, threads, profile_prefix=str(Path(trace_dir) / path.stem))
        timed_pass(session, images, batch)
        events = json.loads(Path(session.end_profiling()).read_text())
    warm_up_runs = -(-len(images) // batch)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][warm_up_runs:]
    first = runs[0]["ts"] if runs else 0
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] >= first]
    by_op: dict[str, float] = defaultdict(float)
    for event in kernels:
        by_op[event["args"]["op_name"]] += event["dur"]
    nodes = {e["name"] for e in kernels}
    n = len(images)
    return {"by_op_us": {op: us / n for op, us in by_op.items()},
            "run_us": sum(e["dur"] for e in runs) / n, "wall_us": wall * 1e6 / n, "nodes": len(nodes)}


def print_profile(name: str, batch: int, result: dict, top: int) -> None:
    kernel = sum(result["by_op_us"].values())
    print(f"{name}, batch {batch}: {1e6 / result['wall_us']:.0f} img/s ({result['wall_us']:.0f} us an image) "
          f"unprofiled; profiled, per image {result['run_us']:.0f} us in session.run, {kernel:.0f} us in {result['nodes']} nodes' kernels, "
          f"{result['run_us'] - kernel:.0f} us ({(result['run_us'] - kernel) / result['run_us']:.0%}) between them")
    ranked = sorted(result["by_op_us"].items(), key=lambda item: -item[1])
    for op, us in ranked[:top]:
        print(f"    {op:<24} {us:8.1f} us/image  {us / kernel:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (a serving worker has 1)")
    parser.add_argument("--images", type=int, default=256, help="validation images in the timed pass")
    parser.add_argument("--top", type=int, default=8, help="operator types listed per profile")
    args = parser.parse_args()

    folder = RunFolder(args.run)
    data = labelled_training_data(folder)
    val, _ = split_indices(folder, data, args.images, 0)
    images = data.source.gather(torch.from_numpy(val)).numpy()
    OnnxPredictor.from_run_int8(args.run)  # quantised first when missing or stale
    graphs = {"fp32": fresh_onnx(args.run), "int8": folder.export_path("onnx-int8")}
    print(f"CPU: {cpu_kind()}; {args.threads} intra-op thread(s); {len(images)} validation images")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for name, path in graphs.items():
            print_profile(name, batch, profile(path, images, batch, args.threads), args.top)


if __name__ == "__main__":
    main()
