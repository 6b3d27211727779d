"""Golden weights: one fp32 epoch on ~1k tiny images gives exactly the weights recorded here.

The digests were recorded from the training code as it was before its loop, strategies and schedule
were restructured (and the restructured code reproduced them); any change of what a run computes
(batch order, learning rate at a step, what is frozen, the head probe, BatchNorm mode) changes
them. A deliberate change of behaviour records new digests, with the reason in the commit. Each case
runs in its own process with portable kernels (tests/golden_support.py), so the bits do not depend
on which x86 CPU runs the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import HANG_S, make_csv_dataset
from golden_support import REPRODUCIBLE_ENV, TRANSFER_ARCH
from imgcls.models import create_model

GOLDEN = {
    "scratch": "cbe527b1edd8b59202eb796de5e8b74280219bb908a35e4139972aa6adc2dcfd",
    "lpft": "4996cd301a362443d6d363d4424bf59f41b4d6c37cfa74aa6f8c6b3ffc3bfc99",
    "head": "6c43e2a6505df1db67d4d399f6071cc18e042a0d21983a76ed7ee9921d2d6a60",
    "partial": "88cec6249f76970a27c88798e2a3462e25b1393565cb2257991a61d34568bcb3",
    "warmup": "885ddd057697cadf7cc79eee38ad8b8e09a7f704726c40550ff192ee1cd8e06d",
}
TESTS = Path(__file__).parent


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


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_one_epoch_gives_the_recorded_weights(thousand_images, start_weights, tmp_path, case):
    src = str(Path(__import__("imgcls").__file__).parents[1])
    env = {**os.environ, **REPRODUCIBLE_ENV,
           "PYTHONPATH": os.pathsep.join([src, str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(TESTS / "golden_support.py"), case, str(thousand_images),
                             str(start_weights), str(tmp_path / case)],
                            env=env, capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == GOLDEN[case]
