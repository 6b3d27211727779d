"""Optional dependencies: a missing one is one line naming the pip install that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from imgcls.errors import ImgclsError

# Import name -> the extra of pyproject.toml that installs it.
EXTRA_OF = {
    "onnx": "export", "onnxruntime": "export",
    "fastapi": "serve", "uvicorn": "serve", "multipart": "serve",
    "tensorboard": "tensorboard",
}


class MissingExtraError(ImgclsError):
    """An optional dependency is not installed."""


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or fail saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF.get(module.split(".")[0], "all")
        raise MissingExtraError(f"{feature} needs the Python package {module.split('.')[0]!r}, which is not "
                                f"installed: pip install 'imgcls[{extra}]'") from None
