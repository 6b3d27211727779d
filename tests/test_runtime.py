"""Precision choice: training and inference may autocast differently, and the loop honours each."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from imgcls import runtime as runtime_module
from imgcls.data.transforms import Preprocess
from imgcls.models import create_model
from imgcls.runtime import Runtime
from imgcls.train.loop import evaluate, train_one_epoch


@pytest.fixture
def fast_bf16_cpu(monkeypatch):
    monkeypatch.setattr(runtime_module, "cpu_has_fast_bf16", lambda: True)


def test_depthwise_models_are_detected():
    assert runtime_module.has_depthwise_conv(create_model("efficientnet_lite0", num_classes=3))
    assert not runtime_module.has_depthwise_conv(create_model("scratch-cnn-tiny", num_classes=3, in_chans=1))


def test_auto_trains_depthwise_models_mixed_and_dense_ones_in_bf16(fast_bf16_cpu):
    lite = runtime_module.make_runtime("cpu", "auto", model=create_model("efficientnet_lite0", num_classes=3))
    assert (lite.train_amp_dtype, lite.amp_dtype, lite.depthwise_fp32) == (torch.bfloat16, torch.bfloat16, True)
    dense = runtime_module.make_runtime("cpu", "auto", model=create_model("scratch-cnn-tiny", num_classes=3,
                                                                           in_chans=1))
    assert (dense.train_amp_dtype, dense.amp_dtype, dense.depthwise_fp32) == (torch.bfloat16, torch.bfloat16, False)


def test_auto_without_fast_bf16_stays_in_fp32(monkeypatch):
    monkeypatch.setattr(runtime_module, "cpu_has_fast_bf16", lambda: False)
    lite = runtime_module.make_runtime("cpu", "auto", model=create_model("efficientnet_lite0", num_classes=3))
    assert (lite.train_amp_dtype, lite.amp_dtype, lite.depthwise_fp32) == (None, None, False)
    assert lite.precision_name(training=True) == "fp32"


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


class DepthwiseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.dw(x)
        self.dw_dtype = y.dtype
        return self.pw(y)


def depthwise_weight_grad(block: DepthwiseBlock, x: torch.Tensor, amp: bool) -> torch.Tensor:
    block.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = block(x)
        assert torch.is_autocast_enabled("cpu") == amp  # the hooks switched it back on
    out.float().square().sum().backward()
    return block.dw.weight.grad


def test_mixed_runs_depthwise_convs_of_training_steps_in_fp32_and_the_rest_in_bf16():
    torch.manual_seed(0)
    block, x = DepthwiseBlock(), torch.randn(8, 4, 6, 6)
    plain = DepthwiseBlock()
    plain.load_state_dict(block.state_dict())
    keys = list(block.state_dict())
    assert runtime_module.keep_depthwise_convs_in_fp32(block) == 1
    assert list(block.state_dict()) == keys  # hooks, not wrappers: checkpoints stay interchangeable

    exact = depthwise_weight_grad(plain, x, amp=False).clone()
    bf16 = depthwise_weight_grad(plain, x, amp=True).clone()
    assert plain.dw_dtype == torch.bfloat16  # unhooked, autocast runs the depthwise conv in bf16
    mixed = depthwise_weight_grad(block, x, amp=True)
    assert block.dw_dtype == torch.float32 and mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < (bf16 - exact).abs().max()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)  # inference keeps bf16: its depthwise forward is fast
    assert block.dw_dtype == torch.bfloat16


def test_mixed_never_leaves_autocast_switched_off_after_an_error():
    block = DepthwiseBlock()
    runtime_module.keep_depthwise_convs_in_fp32(block)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            block(torch.randn(2, 3, 6, 6))  # wrong channel count: the conv raises inside the hooks
        assert torch.is_autocast_enabled("cpu")


def test_mixed_precision_runtime(fast_bf16_cpu):
    mixed = runtime_module.make_runtime("cpu", "mixed", model=create_model("efficientnet_lite0", num_classes=3))
    assert (mixed.train_amp_dtype, mixed.amp_dtype, mixed.depthwise_fp32) == (torch.bfloat16, torch.bfloat16, True)
    assert mixed.precision_name(training=True) == "bf16, depthwise convolutions fp32"
    assert mixed.precision_name() == "bf16"
    assert not runtime_module.make_runtime("cpu", "bf16").depthwise_fp32
