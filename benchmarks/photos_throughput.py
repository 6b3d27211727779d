"""Photo throughput, side by side in one run: cache build, training from the cache, frozen features.

On the landscape set of benchmarks/photos_at_scale.py (500x375 JPEGs):
- cache build images/s at the storage size of a 96-px and of a 224-px run, with the process pool
  (every core) and in one process, with the CPU seconds spent per image (user + system, the pool's
  workers included): on a busy machine wall time per image is inflated by waiting for a core, CPU
  time far less, so a quiet machine's pool rate is about cores / that CPU cost; and the other
  tree's single-process path on the same files;
- training images/s of Lite0 (all layers, fp32, photo augmentation) from the memory-mapped cache
  against the same images in an in-memory tensor, alternating A/B so a busy machine hits both alike;
- the frozen-feature pass at 96 px (uint8 batches gathered from the cache, normalised and resized)
  against Lite0's bare forward on ready float tensors of the same batch.

Usage: python benchmarks/photos_throughput.py --other-src /tmp/prephotos_src/src [--work /tmp/photos-bench]
       [--images 2000] [--rounds 3] [--train-steps 8] [--feature-images 1024] [--skip build,train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
HERE_SRC = str(HERE.parent / "src")
sys.path.insert(0, str(HERE))
sys.path.insert(0, HERE_SRC)

from photos_at_scale import fresh_cache_env, make_dataset  # noqa: E402

BUILD = """
import json, resource, sys, time
import imgcls.data.cache as cache
from imgcls.data import load_dataset
if sys.argv[3] == "one":
    cache.decode_workers = lambda n, source_size: 1
kwargs = {} if sys.argv[2] == "none" else {"input_side": int(sys.argv[2])}
def cpu():
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
t, c = time.perf_counter(), cpu()
data = load_dataset(sys.argv[1], **kwargs)
seconds, cpu_s = time.perf_counter() - t, cpu() - c
print(json.dumps({"seconds": seconds, "cpu_s": cpu_s, "images": len(data.ids)}))
"""


def build(root: Path, src: str, side: int | None, processes: str, work: Path) -> dict:
    env = fresh_cache_env(src, work)
    out = subprocess.run([sys.executable, "-c", BUILD, str(root), str(side or "none"), processes], env=env,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"images_per_s": result["images"] / result["seconds"],
            "ms_per_image": 1000 * result["seconds"] / result["images"],
            "cpu_ms_per_image": 1000 * result["cpu_s"] / result["images"], "load": os.getloadavg()[0]}


def build_rows(root: Path, other_src: str, work: Path) -> Iterator[dict]:
    yield {"part": "build", "tree": "other", "input_side": None, "processes": "one",
           **build(root, other_src, None, "one", work)}
    for side in (96, 224):
        for processes in ("pool", "one"):
            yield {"part": "build", "tree": "this", "input_side": side, "processes": processes,
                   **build(root, HERE_SRC, side, processes, work)}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch pages, allocator, kernels
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def throughput_rows(root: Path, work: Path, rounds: int, steps: int, features_n: int) -> list[dict]:
    import torch
    from imgcls.data import load_dataset
    from imgcls.data.batches import iterate_batches
    from imgcls.data.source import TensorSource
    from imgcls.data.transforms import PhotoAugment, Preprocess
    from imgcls.models import create_model
    from imgcls.runtime import Runtime
    from imgcls.train.features import pooled_features
    from imgcls.train.loop import train_one_epoch
    from imgcls.train.optim import build_optimizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    os.environ["IMGCLS_CACHE_DIR"] = str(work / "cache")
    data = load_dataset(root, input_side=96)
    sources = {"memmap": data.source, "tensor": TensorSource(data.source.gather(torch.arange(len(data.source))))}
    runtime = Runtime(torch.device("cpu"))
    model = create_model("efficientnet_lite0", len(data.classes.names))
    pre = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, (96, 96))
    optimizer = build_optimizer([{"name": "all", "params": list(model.parameters()), "lr": 1e-3}], 0.0)
    batch = 64
    subset = torch.arange(batch * steps)

    def train(source) -> float:
        stats = train_one_epoch(model, iterate_batches(source, data.targets, batch, indices=subset), optimizer=optimizer,
                                preprocess=pre, runtime=runtime, generator=torch.Generator().manual_seed(0),
                                augment=PhotoAugment())
        return stats["images_per_s"]

    ready = pre(data.source.gather(torch.arange(256)))

    @torch.no_grad()
    def bare_forward() -> None:
        model.eval()
        for _ in range(features_n // 256):
            model.forward_head(model.forward_features(ready), pre_logits=True)

    def feature_pass() -> None:
        pooled_features(model, data.source, torch.arange(features_n), preprocess=pre, runtime=runtime, batch_size=256)

    rows = []
    train(sources["memmap"])  # warm-up: page cache and kernels
    for r in range(rounds):
        speed = {name: train(source) for name, source in sources.items()}
        rows.append({"part": "train", "round": r, **speed, "ratio_memmap_over_tensor": speed["memmap"] / speed["tensor"],
                     "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    for r in range(rounds):
        bare = features_n / timed(bare_forward, 1)
        feat = features_n / timed(feature_pass, 1)
        rows.append({"part": "features", "round": r, "bare_forward_img_s": bare, "feature_pass_img_s": feat,
                     "ratio": feat / bare, "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", required=True, help="src/ folder of the code to compare against")
    parser.add_argument("--work", default="/tmp/photos-bench")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=8, help="training steps of 64 images per measurement")
    parser.add_argument("--feature-images", type=int, default=1024, help="images per feature pass (a multiple of 256)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: build,train")
    args = parser.parse_args()
    work = Path(args.work)
    skip = set(filter(None, args.skip.split(",")))
    root = make_dataset(work / f"landscape-{args.images}", args.images, only_landscape=True)
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; load {os.getloadavg()}", flush=True)
    if "build" not in skip:
        for row in build_rows(root, args.other_src, work):
            print(json.dumps(row), flush=True)
    if "train" not in skip:
        throughput_rows(root, work, args.rounds, args.train_steps, args.feature_images)
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
