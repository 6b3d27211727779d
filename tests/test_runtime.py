"""Precision choice: training and inference may autocast differently, and the loop honours each."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from imgcls import runtime as runtime_module
from imgcls.data.transforms import Preprocess
from imgcls.models import create_model
from imgcls.train.loop import Runtime, evaluate, train_one_epoch


@pytest.fixture
def fast_bf16_cpu(monkeypatch):
    monkeypatch.setattr(runtime_module, "cpu_has_fast_bf16", lambda: True)


def test_depthwise_models_are_detected():
    assert runtime_module.has_depthwise_conv(create_model("efficientnet_lite0", num_classes=3))
    assert not runtime_module.has_depthwise_conv(create_model("scratch-cnn-tiny", num_classes=3, in_chans=1))


def test_auto_trains_depthwise_models_in_fp32_but_infers_in_bf16(fast_bf16_cpu):
    lite = runtime_module.make_runtime("cpu", "auto", model=create_model("efficientnet_lite0", num_classes=3))
    assert (lite.train_amp_dtype, lite.amp_dtype) == (None, torch.bfloat16)
    dense = runtime_module.make_runtime("cpu", "auto", model=create_model("scratch-cnn-tiny", num_classes=3,
                                                                           in_chans=1))
    assert (dense.train_amp_dtype, dense.amp_dtype) == (torch.bfloat16, torch.bfloat16)


def test_explicit_precision_applies_to_training_too(fast_bf16_cpu):
    lite = create_model("efficientnet_lite0", num_classes=3)
    assert runtime_module.make_runtime("cpu", "bf16", model=lite).train_amp_dtype == torch.bfloat16
    fp32 = runtime_module.make_runtime("cpu", "fp32", model=lite)
    assert (fp32.train_amp_dtype, fp32.amp_dtype) == (None, None)


class AutocastSpy(nn.Module):
    """Records whether autocast was on for each forward pass."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.fc(x.flatten(1))


def test_loop_uses_the_training_dtype_for_steps_and_the_inference_dtype_for_evaluation():
    spy = AutocastSpy()
    runtime = Runtime(torch.device("cpu"), amp_dtype=torch.bfloat16, train_amp_dtype=None)
    batches = [(torch.randint(0, 255, (3, 2, 2, 1), dtype=torch.uint8), torch.tensor([0, 1, 0]))]
    kw = dict(preprocess=Preprocess((0.5,), (0.5,), 1), runtime=runtime)
    train_one_epoch(spy, batches, optimizer=torch.optim.SGD(spy.parameters(), 0.1),
                    generator=torch.Generator(), **kw)
    assert spy.seen == [False]
    evaluate(spy, batches, **kw)
    assert spy.seen == [False, True]
