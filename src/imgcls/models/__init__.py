"""Models: one registry for scratch CNNs and ImageNet backbones."""

from imgcls.models.registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
