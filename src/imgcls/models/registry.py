"""One registry keyed by name: create_model(name, num_classes, in_chans, ...) for every model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from imgcls.errors import ImgclsError, OptionError


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of the tool needs to know about a model before building it."""

    name: str
    builder: Callable[..., nn.Module]
    description: str
    family: str = "scratch"  # "scratch" or "timm"
    default_image_size: int | None = None  # None: the data's own size
    min_image_size: int = 8
    mean: tuple[float, ...] | None = None  # None: measured from the training data
    std: tuple[float, ...] | None = None
    pretrained_available: bool = False
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
_FALLBACKS: list[Callable[[str], ModelSpec | None]] = []


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model; names are unique."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_fallback(resolver: Callable[[str], ModelSpec | None]) -> None:
    """A resolver for names outside the registry (e.g. any timm model name)."""
    _FALLBACKS.append(resolver)


def list_models() -> list[str]:
    _load_builtin_models()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec for `name`; unknown names fail listing the valid ones."""
    _load_builtin_models()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for resolver in _FALLBACKS:
        spec = resolver(name)
        if spec is not None:
            return spec
    raise OptionError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build model `name` with a fresh `num_classes` head for `in_chans`-channel input."""
    return get_spec(name).builder(num_classes=num_classes, in_chans=in_chans, **kwargs)


def check_input_size(spec: ModelSpec, size: tuple[int, int], data_source: str | None = None) -> None:
    """Refuse an input the network would pool down to nothing, before any file of a run is written.

    `data_source` names the dataset when `size` is the data's own size, None when --image-size asked for it.
    """
    if min(size) >= spec.min_image_size:
        return
    if data_source is None:
        raise ImgclsError(f"--image-size {min(size)} is below {spec.name}'s minimum of {spec.min_image_size} px")
    raise ImgclsError(f"{data_source}: images are {size[0]}x{size[1]} px, below {spec.name}'s minimum of "
                      f"{spec.min_image_size} px; add --image-size {spec.min_image_size} (or larger) to enlarge them")


def _load_builtin_models() -> None:
    # Importing the modules registers their models; done lazily so `import imgcls` stays cheap.
    from imgcls.models import scratch  # noqa: F401
    try:
        from imgcls.models import backbones  # noqa: F401
    except ImportError:  # pragma: no cover - backbones need timm, always installed by set-up
        pass
