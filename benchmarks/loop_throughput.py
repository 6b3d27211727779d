"""Training-loop throughput vs a bare PyTorch loop over in-memory tensors (same model, batch, precision).

Usage: python benchmarks/loop_throughput.py [--model scratch-cnn] [--steps 120] [--batch-size 128]
Prints one table row per loop; the ratio is imgcls loop / bare loop.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from imgcls.data import load_dataset
from imgcls.data.batches import iterate_batches
from imgcls.data.transforms import Augment, Preprocess
from imgcls.models import create_model
from imgcls.runtime import make_runtime
from imgcls.train.ema import WeightEMA
from imgcls.train.loop import train_one_epoch
from imgcls.train.optim import build_optimizer


def bare_loop(model, x_all, y_all, optimizer, batch_size, steps, runtime) -> float:
    """The reference: pre-normalised float NCHW tensors in memory, nothing else."""
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        i = (step * batch_size) % (len(x_all) - batch_size)
        x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
        with runtime.autocast(training=True):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def imgcls_loop(model, images, targets, optimizer, preprocess, runtime, batch_size, steps, augment,
                ema: WeightEMA | None = None) -> float:
    gen = torch.Generator().manual_seed(0)
    subset = torch.arange(steps * batch_size) % len(images)
    stats = train_one_epoch(model, iterate_batches(images, targets, batch_size, indices=subset),
                            optimizer=optimizer, preprocess=preprocess, runtime=runtime, generator=gen,
                            augment=augment, label_smoothing=0.1, after_step=ema.update if ema else None)
    return stats["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/fashion-mnist/train")
    parser.add_argument("--model", default="scratch-cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    data = load_dataset(args.data)
    preprocess = Preprocess((0.286,), (0.353,), 1)
    model = create_model(args.model, num_classes=10, in_chans=1)
    runtime = make_runtime("auto", args.precision, channels_last=True, model=model)
    model = model.to(runtime.device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer([{"name": "all", "params": list(model.parameters()), "lr": 1e-3}], 0.05)
    n = min(len(data.images), 8192)
    x_all = preprocess(data.images[:n], runtime.device, channels_last=True)
    y_all = data.targets[:n].to(runtime.device)
    rows = []
    for _ in range(2):  # alternate to average out load changes on a shared machine
        bare_loop(model, x_all, y_all, optimizer, args.batch_size, 10, runtime)  # warm-up
        rows.append(("bare loop (in-memory float tensors)",
                     bare_loop(model, x_all, y_all, optimizer, args.batch_size, args.steps, runtime)))
        rows.append(("imgcls train_one_epoch, no augmentation",
                     imgcls_loop(model, data.images, data.targets, optimizer, preprocess, runtime,
                                 args.batch_size, args.steps, None)))
        rows.append(("imgcls train_one_epoch, flip + shift",
                     imgcls_loop(model, data.images, data.targets, optimizer, preprocess, runtime,
                                 args.batch_size, args.steps, Augment(True, 2))))
        rows.append(("imgcls train_one_epoch, flip + weight EMA",
                     imgcls_loop(model, data.images, data.targets, optimizer, preprocess, runtime,
                                 args.batch_size, args.steps, Augment(True, 0), WeightEMA(model, 0.99))))
    bare = sum(r[1] for r in rows if r[0].startswith("bare")) / 2
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, "
          f"{runtime.device.type}/{runtime.precision_name(training=True)}")
    print(f"| loop | img/s (mean of 2) | vs bare |\n|---|---|---|")
    for name in dict.fromkeys(r[0] for r in rows):
        speed = sum(r[1] for r in rows if r[0] == name) / 2
        print(f"| {name} | {speed:.0f} | {speed / bare:.2f}x |")


if __name__ == "__main__":
    main()
