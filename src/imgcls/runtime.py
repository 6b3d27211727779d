"""Pick device and precision once: everything runs on the CPU and uses a GPU when there is one."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from imgcls.errors import OptionError

PRECISIONS = ("auto", "fp32", "bf16", "mixed")


@dataclass
class Runtime:
    """Where and how tensors are computed: device, autocast dtypes, memory format.

    Training steps and inference passes may autocast differently: on CPU, bf16 speeds up the
    forward pass of every model measured, but slows the backward pass of depthwise convolutions
    (see make_runtime).
    """

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    train_amp_dtype: torch.dtype | None = None  # None: training steps run in fp32
    depthwise_fp32: bool = False  # training steps run depthwise convolutions in fp32 ('mixed')

    def amp_dtype_for(self, training: bool) -> torch.dtype | None:
        return self.train_amp_dtype if training else self.amp_dtype

    def autocast(self, training: bool = False):
        dtype = self.amp_dtype_for(training)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def precision_name(self, training: bool = False) -> str:
        if not self.amp_dtype_for(training):
            return "fp32"
        return "bf16, depthwise convolutions fp32" if training and self.depthwise_fp32 else "bf16"


def cpu_info() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", set()) where there is none."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return "", set()

    def field(key: str) -> str:
        return next((line.split(":", 1)[1] for line in lines if line.startswith(key)), "")
    return field("model name").strip(), set(field("flags").split())


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 / AMX make bf16 autocast faster than fp32 on CPU; without them it is slower."""
    check = getattr(torch.backends.cpu, "get_cpu_capability", None)
    capability = check() if check else ""
    return "AVX512" in capability.upper() and bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8) sums uint8 x int8 products in 32 bits; without it,
    x86 int8 kernels add pairs in 16 bits, which can saturate with full 8-bit weights."""
    return bool(cpu_info()[1] & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_kind() -> str:
    """One line naming the processor and what picks its fast kernels, for benchmark output."""
    model, flags = cpu_info()
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    amx = ", AMX" if flags & {"amx_bf16", "amx_int8"} else ""  # Intel's matrix units: another kernel family
    return (f"{model or platform.processor()}, {bf16}{amx}, {'VNNI' if cpu_has_vnni() else 'no VNNI'}, "
            f"{os.cpu_count()} cores")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda asked for, but no CUDA GPU is visible")
    return device


def is_depthwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def has_depthwise_conv(model: nn.Module) -> bool:
    """True when the model has depthwise (one group per channel) convolutions, as EfficientNets do."""
    return any(is_depthwise_conv(m) for m in model.modules())


def _autocast_off(module: nn.Module, args: tuple):
    device = args[0].device.type
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device)):
        return None  # inference passes keep bf16: the depthwise forward is fast in bf16
    torch.set_autocast_enabled(device, False)
    module._autocast_suspended = device
    return (args[0].float(), *args[1:])


def _autocast_back_on(module: nn.Module, args: tuple, output):
    device = module.__dict__.pop("_autocast_suspended", None)
    if device:
        torch.set_autocast_enabled(device, True)


def keep_depthwise_convs_in_fp32(model: nn.Module) -> int:
    """Run the depthwise convolutions of training steps in fp32 under bf16 autocast ('mixed').

    Hooks, not wrapper modules, so the state dict keeps its keys. Their bf16 backward is the one
    slow part of bf16 training on CPU (see make_runtime); everything else keeps bf16's speed.
    The closing hook runs even when the forward raises, so autocast is never left switched off.
    Returns the number of convolutions hooked.
    """
    hooked = 0
    for m in model.modules():
        if is_depthwise_conv(m):
            m.register_forward_pre_hook(_autocast_off)
            m.register_forward_hook(_autocast_back_on, always_call=True)
            hooked += 1
    return hooked


def make_runtime(device: str | torch.device = "auto", precision: str = "auto",
                 channels_last: bool = True, model: nn.Module | None = None) -> Runtime:
    """Runtime for the device; 'auto' precision = bf16 autocast where the hardware supports it fast.

    On CPU, 'auto' trains a model with depthwise convolutions 'mixed': bf16 autocast with the
    depthwise convolutions of training steps in fp32 (the caller hooks them:
    keep_depthwise_convs_in_fp32), because their bf16 backward pass is slower than fp32's while
    everything else gains from bf16. Dense CNNs train faster in plain bf16, so they keep it for
    both. The measurements behind this are in README.md (`--precision`).
    """
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    amp = None
    if precision in ("bf16", "mixed"):
        amp = torch.bfloat16
    elif precision == "auto":
        fast = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
        amp = torch.bfloat16 if fast else None
    depthwise_fp32 = precision == "mixed" or (
        precision == "auto" and amp is not None and dev.type == "cpu" and model is not None
        and has_depthwise_conv(model))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, amp, channels_last, train_amp_dtype=amp, depthwise_fp32=depthwise_fp32)


def compile_or_eager(model: nn.Module, warm_up: Callable[[nn.Module], None],
                     log: Callable[[str], None] = print) -> nn.Module:
    """torch.compile(model), compiled right away by `warm_up(compiled)` so the caller can time it
    (and count it against a budget) apart from the training steps; where compiling is unavailable
    or fails (no C++ compiler, an unsupported Python or operator), the eager model and one line
    saying so. torch.compile is lazy: only the warm-up call shows whether it works."""
    try:
        compiled = torch.compile(model)
        warm_up(compiled)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: train eagerly
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        log(f"note: --compile unavailable here ({type(exc).__name__}: {reason}); training without it")
        return model
    return compiled
