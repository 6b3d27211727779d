"""Camera-sized JPEG datasets from real photographs: memory of `imgcls train` and cache build speed,
this tree against another (e.g. main: `git archive main src | tar -x -C /tmp/main_src`).

Datasets: crops of scikit-image's sample photographs (the class is the source photograph), resized
to 500x375 / 640x480 / 375x500 and saved as JPEG quality 88, in class folders under --work.

Measured, side by side:
- `imgcls train DIR --model efficientnet_lite0 --pretrained --strategy head --image-size 96 --epochs 2`
  (cold cache): peak RssAnon, peak RssFile (page cache mapped by the process) and VmHWM, sampled
  from /proc/PID/status of the child every 0.1 s;
- cache build images/s for 500x375 JPEGs at the storage size of a 96-px and of a 224-px run, and
  the other tree's single-process path on the same files.

Usage: python benchmarks/photos_at_scale.py --other-src /tmp/main_src/src [--sizes 2000,8000,50000]
       [--old-up-to 8000] [--build-images 2000] [--work /tmp/photos-bench]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE_SRC = str(Path(__file__).resolve().parents[1] / "src")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera")
SHAPES = ((500, 375), (640, 480), (375, 500))  # width x height, as cameras and phones write them


def _sources() -> list[np.ndarray]:
    import skimage.data
    out = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        out.append(np.stack([image] * 3, -1) if image.ndim == 2 else image[:, :, :3])
    return out


def _write_chunk(task: tuple[str, int, int, int, bool]) -> None:
    from PIL import Image
    root, start, stop, seed, only_landscape = task
    sources = _sources()
    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        cls = i % len(PHOTOS)
        photo = sources[cls]
        h, w = photo.shape[:2]
        side = rng.uniform(0.4, 1.0) * min(h, w)
        crop_w, crop_h = min(w, side * rng.uniform(1.0, 1.4)), side
        left, top = rng.uniform(0, w - crop_w), rng.uniform(0, h - crop_h)
        out_w, out_h = SHAPES[0] if only_landscape else SHAPES[rng.integers(len(SHAPES))]
        image = Image.fromarray(photo).resize((out_w, out_h), Image.BILINEAR,
                                              box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(Path(root) / PHOTOS[cls] / f"{i:06d}.jpg", quality=88)


def make_dataset(root: Path, n: int, only_landscape: bool = False, seed: int = 0) -> Path:
    """n JPEGs in class folders (reused when already complete)."""
    done = root / "complete.json"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for name in PHOTOS:
        (root / name).mkdir(parents=True)
    tasks = [(str(root), a, min(a + 250, n), seed, only_landscape) for a in range(0, n, 250)]
    with multiprocessing.get_context("fork").Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(_write_chunk, tasks)
    done.write_text(json.dumps({"images": n}))
    return root


BUILD = """
import json, sys, time
from imgcls.data import load_dataset
kwargs = {} if sys.argv[2] == "none" else {"input_side": int(sys.argv[2])}
t = time.perf_counter()
data = load_dataset(sys.argv[1], **kwargs)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "images": len(data.ids), "shape": list(data.images.shape[1:])}))
"""


def fresh_cache_env(src: str, work: Path) -> dict:
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    return {**os.environ, "PYTHONPATH": src, "IMGCLS_CACHE_DIR": str(cache)}


def build_speed(root: Path, src: str, input_side: int | None, work: Path) -> dict:
    env = fresh_cache_env(src, work)
    out = subprocess.run([sys.executable, "-c", BUILD, str(root), str(input_side or "none")], env=env,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "images_per_s": result["images"] / result["seconds"], "load": os.getloadavg()[0]}


def status_kb(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def train_memory(root: Path, src: str, work: Path, timeout_s: float | None = None) -> dict:
    """Peaks of the child's memory; past timeout_s the child is stopped and the peaks so far reported."""
    env = fresh_cache_env(src, work)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgcls", "train", str(root), "--out", str(out), "--model", "efficientnet_lite0",
           "--pretrained", "--strategy", "head", "--image-size", "96", "--epochs", "2"]
    t = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}
    loads = []
    while child.poll() is None:
        if timeout_s is not None and time.perf_counter() - t > timeout_s:
            child.kill()
            child.wait()
            break
        try:
            for key, value in status_kb(child.pid).items():
                peak[key] = max(peak.get(key, 0), value)
        except OSError:
            pass
        loads.append(os.getloadavg()[0])
        time.sleep(0.1)
    err = child.stderr.read()
    peaks = {"rss_anon_mb": peak.get("RssAnon", 0) / 1024, "rss_file_mb": peak.get("RssFile", 0) / 1024,
             "vm_hwm_mb": peak.get("VmHWM", 0) / 1024, "load": float(np.mean(loads)) if loads else None}
    if child.returncode == -9:
        return {"completed": False, "stopped_after_s": time.perf_counter() - t, **peaks}
    if child.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"}
    run = json.loads((out / "run.json").read_text())
    return {"completed": True, "seconds": time.perf_counter() - t, **peaks, "val_acc": run.get("best_val_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-src", required=True, help="src/ folder of the code to compare against")
    parser.add_argument("--sizes", default="2000,8000,50000")
    parser.add_argument("--old-up-to", type=int, default=8000, help="largest set the other tree trains on")
    parser.add_argument("--build-images", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/photos-bench")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: build,train")
    parser.add_argument("--train-timeout", type=float, help="stop each training run after this many seconds")
    args = parser.parse_args()
    work = Path(args.work)
    skip = set(filter(None, args.skip.split(",")))
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "build" not in skip:
        landscape = make_dataset(work / f"landscape-{args.build_images}", args.build_images, only_landscape=True)
        for tree, src, sides in (("other", args.other_src, (None,)), ("this", HERE_SRC, (96, 224))):
            for side in sides:
                report({"part": "build", "tree": tree, "input_side": side, **build_speed(landscape, src, side, work)})
    if "train" not in skip:
        for n in map(int, args.sizes.split(",")):
            root = make_dataset(work / f"photos-{n}", n)
            trees = [("this", HERE_SRC)] + ([("other", args.other_src)] if n <= args.old_up_to else [])
            for tree, src in trees:
                report({"part": "train", "tree": tree, "images": n,
                        **train_memory(root, src, work, args.train_timeout)})
    print(f"\n{os.cpu_count()} CPUs seen; load average at the end {os.getloadavg()}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
