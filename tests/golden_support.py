"""One golden case, run in its own process with kernels that compute the same bits on every x86 CPU.

    python tests/golden_support.py CASE DATA_DIR START_WEIGHTS OUT_DIR   # prints the weights' digest

Floating-point results depend on the kernels a CPU dispatches to (AVX2, AVX-512, oneDNN's JIT
blocking for the cache sizes at hand) and on the thread count. The parent sets, before torch loads:
ATen's portable (non-vectorised) kernels, MKL's conditional numerical reproducibility, one thread;
this script turns oneDNN and NNPACK off, so convolutions go through im2col and MKL's reproducible GEMM.
NNPACK, which otherwise takes the forward pass of a batch of 16 or more, has its own x86 kernels
outside MKL_CBWR's reach (its convolution bits stay the same whatever MKL_CBWR says, im2col's follow
it): with NNPACK on, an Intel Xeon computed other digests than the AMD Zen CPUs they were recorded on.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

# Set in the environment before torch is imported (see golden_environment).
REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TRANSFER_ARCH = "test_efficientnet"


def golden_configs(data: Path, weights: Path) -> dict:
    from imgcls.config import TrainConfig

    common = dict(data_dir=str(data / "train"), epochs=1, batch_size=64, precision="fp32", seed=3,
                  channels_last=False)
    transfer = dict(model=TRANSFER_ARCH, weights=str(weights), image_size=32)
    return {
        # Random init, augmentation auto (flip + shift below 10k images), one-cycle schedule.
        "scratch": TrainConfig(model="scratch-cnn", strategy="scratch", **common),
        # LP-FT: head probe on cached features, then the whole network with frozen BN statistics.
        "lpft": TrainConfig(strategy="finetune", bn_stats="frozen", head_probe_epochs=3, **transfer, **common),
        # The head alone on cached features.
        "head": TrainConfig(strategy="head", **transfer, **common),
        # The stem-side half frozen, BatchNorm statistics adapting: no probe.
        "partial": TrainConfig(strategy="partial", bn_stats="train", **transfer, **common),
        # Plain finetune: a head-only warm-up epoch on images, then the whole network.
        "warmup": TrainConfig(strategy="finetune", bn_stats="frozen", head_probe_epochs=0, **transfer,
                              **{**common, "epochs": 2}),
    }


def weights_digest(state: dict) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), not the file: metadata may change."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def main(case: str, data: Path, weights: Path, out: Path) -> None:
    import torch

    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    torch.set_num_threads(1)
    from imgcls.train.checkpoint import load_checkpoint
    from imgcls.train.runner import fit

    config = golden_configs(data, weights)[case]
    run = fit(config, out, device="cpu", log=lambda _: None)
    assert run["epochs"] == config.epochs and run["data"]["train"] > 850
    # What the last epoch computed (the checkpoint's weights), whichever model validation picked as best.
    print(weights_digest(load_checkpoint(out / "checkpoint.pt")["model"]))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
