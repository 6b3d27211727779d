"""--compile: compiled outputs equal eager ones, compiling leaves no trace in training, and a
compiler that fails falls back to eager with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import make_csv_dataset
from imgcls.config import TrainConfig
from imgcls.runtime import compile_or_eager
from imgcls.train.runner import fit


def tiny_conv_net() -> nn.Module:
    # Deliberately tiny: inductor's C++ build of even this costs tens of CPU-seconds.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_compiled_model_gives_the_eager_outputs() -> None:
    model, x = tiny_conv_net(), torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        compiled = compile_or_eager(model, lambda m: m(x), log=pytest.fail)  # a fallback notice fails the test
        assert compiled is not model
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_a_compiler_that_fails_on_first_use_falls_back_to_eager_with_one_line(monkeypatch) -> None:
    def broken_compile(model: nn.Module, **_) -> nn.Module:
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nlong traceback text")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    lines: list[str] = []
    model = tiny_conv_net()
    assert compile_or_eager(model, lambda m: m(torch.randn(2, 1, 8, 8)), log=lines.append) is model
    assert lines == ["note: --compile unavailable here (RuntimeError: no C++ compiler found); training without it"]


def config_for(data: Path, compile_: bool) -> TrainConfig:
    return TrainConfig(data_dir=str(data), model="scratch-cnn-tiny", epochs=2, batch_size=8, precision="fp32",
                       channels_last=False, seed=1, compile=compile_)


def test_the_compile_warm_up_leaves_no_trace_in_the_run(tmp_path: Path, monkeypatch) -> None:
    """The warm-up step's forward and backward must not move weights or BatchNorm statistics: with a
    stand-in compiler (the model itself, so no C++ build is needed) the run equals one without it."""
    data = make_csv_dataset(tmp_path / "ds", n_per_class=8) / "train"
    fit(config_for(data, False), tmp_path / "eager", device="cpu", log=lambda _: None)
    calls = []

    class StandIn(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            calls.append(model)
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    monkeypatch.setattr(torch, "compile", StandIn)
    lines: list[str] = []
    fit(config_for(data, True), tmp_path / "compiled", device="cpu", log=lines.append)
    assert len(calls) == 1 and any(line.startswith("compiled the training step in") for line in lines)
    run = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run["compile"]["compiled"] is True and run["compile"]["seconds"] >= 0
    a = load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
