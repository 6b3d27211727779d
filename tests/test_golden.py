"""Golden weights: one fp32 epoch on ~1k tiny images gives exactly the weights recorded here.

The digests were recorded from the training code before its loop, strategies and schedule were
restructured; any change of what a run computes (batch order, learning rate at a step, what is
frozen, the head probe, BatchNorm mode) changes them. A deliberate change of behaviour records new
digests, with the reason in the commit. Floating-point results depend on the kernels, so the
thread count is pinned; a different CPU instruction set or torch build may need new digests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_csv_dataset
from imgcls.config import TrainConfig
from imgcls.models import create_model
from imgcls.train.runner import fit

TRANSFER_ARCH = "test_efficientnet"

GOLDEN = {
    "scratch": "40a72f78fd8812efe69512e493aa757da884294de733184bebe3818247872097",
    "lpft": "38b76d271e95054f61211dc99db676ef46ad172750f258cb27e52305f3485c21",
    "head": "5b2f507b68813441a38e63fe21c86695d6114fa84ddfd5147089a1c71f128bad",
    "partial": "25b8a84ae9840170a929dc2e20ef23ec605e2891a5e0fd29040e8cd42fc0d5d5",
    "warmup": "7d2c39d076bd4afda307e3b010bca0a476795308b1677bd94f8703c85cbc9002",
}


@pytest.fixture(scope="module")
def thousand_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv_dataset(tmp_path_factory.mktemp("golden") / "ds", n_per_class=334, n_test=3)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained-style starting point: a seeded random backbone saved as safetensors."""
    torch.manual_seed(7)
    model = create_model(TRANSFER_ARCH, num_classes=1000)
    path = tmp_path_factory.mktemp("start") / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    return path


@pytest.fixture
def one_thread():
    """Reductions split across threads sum in another order: pin the count for exact weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weights_digest(model_file: Path) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), not the file: metadata may change."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_file(str(model_file)).items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def golden_configs(data: Path, weights: Path) -> dict[str, TrainConfig]:
    common = dict(data_dir=str(data / "train"), epochs=1, batch_size=64, precision="fp32", seed=3)
    transfer = dict(model=TRANSFER_ARCH, weights=str(weights), image_size=32, channels_last=False)
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


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_one_epoch_gives_the_recorded_weights(thousand_images, start_weights, tmp_path, one_thread, case):
    config = golden_configs(thousand_images, start_weights)[case]
    run = fit(config, tmp_path / case, device="cpu", log=lambda _: None)
    assert run["epochs"] == run["best_epoch"] == config.epochs  # the file holds the last epoch's weights
    assert run["data"]["train"] > 850
    assert weights_digest(tmp_path / case / "model.safetensors") == GOLDEN[case]
