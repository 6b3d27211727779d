"""Golden weights: one fp32 epoch on ~1k tiny images gives exactly the weights recorded here.

The first digests were recorded from the training code as it was before its loop, strategies and
schedule were restructured (and the restructured code reproduced them); these were recorded again,
from the same code, when NNPACK was turned off for the portable kernels. Any change of what a run computes
(batch order, learning rate at a step, what is frozen, the head probe, BatchNorm mode) changes
them. A deliberate change of behaviour records new digests, with the reason in the commit. Each case
runs in its own process with portable kernels (tests/golden_support.py), so the bits are the same
on the Zen 3, Zen 4 and Intel AMX CPUs; an AMD Zen 5 computes other bits, recorded beside them.
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
from imgcls.runtime import cpu_kind

# Two digests a case: the first as recorded on the AMD Zen 3 / Zen 4 and Intel Xeon (AMX) CPUs of
# the CI machines; the second from the same code on an AMD Zen 5 (CPU family 26), where the portable
# kernels still give other bits (which library's dispatch differs there was not pinned down). A
# change of what a run computes changes both; a CPU that matches neither gets its own entry, recorded
# from unchanged code, with the CPU named in the commit.
GOLDEN = {
    "scratch": ("348bf659421dee31e3f1fe74bde487ce364459afdcf49c42441e119d952b641b",
                "a864a7b55865b8947f028ef120eb8e39accf9ee55f057b95919973eeca8ea0e6"),
    "lpft": ("9af2432ba259724eeec7cf2b975d9d6ff987f14a54d797e3bc1a9ec194336141",
             "3b22294b62b72c52dff38bbd3a4612ae6652e1eb4d7ce721de91416ff22c3b16"),
    "head": ("df90e6985b15d5a64fc1d886e97e9521246fd756659a14699659162b761e87b8",
             "8173af5a2fb964e158ea14a04c291e69420734cf76f6ddd02c1ce374d75c7d16"),
    "partial": ("f6fe3c54dc673ee033dea1b0f3d944c3e1ee74ec38b15167c8ec0536da009480",
                "2b266c1d97a214021057f310ad45e1fc2991f66d8d86e3863ef8a3553db5e872"),
    "warmup": ("3a0f883d76068d58e57e3cd9ab8794b8d4b0a92e984fab9ca17be0541df65fea",
               "35aed4d04f9ceaf12b5eb654b049f52f840cc1823fca1571c7b85c2667ae5c9e"),
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
    assert result.stdout.split()[-1] in GOLDEN[case], f"digest of {case} on {cpu_kind()}: not a recorded one"
