"""ImageNet backbones: registry surface, offline weight resolution, input adaptation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from skimage import data as skdata

from imgcls.config import TrainConfig
from imgcls.data import load_dataset
from imgcls.data.transforms import Preprocess
from imgcls.errors import ImgclsError, WeightsError
from imgcls.models import create_model, get_spec, list_models
from imgcls.models.weights import load_pretrained
from imgcls.models.io import save_model, sha256_file
from imgcls.train.runner import fit, resolve_preprocess

SEED_LIST = ["vgg16", "vgg19", "resnet18", "resnet50", "inception_v3", "xception",
             "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def random_timm_weights(timm_name: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ImageNet-shaped (1000-class) random-init state dict, saved as safetensors or torch file."""
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(timm_name).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty hub caches and no hub access: only --weights and weight packages can work."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read per call, not the env
    monkeypatch.setattr("torch.hub.urlopen", _no_network)
    return tmp_path / "torch_home"


def _no_network(*args, **kwargs):
    raise OSError("network disabled in tests")


def test_registry_has_the_zoo_with_pretrained_normalisation():
    names = list_models()
    for name in SEED_LIST:
        assert name in names and get_spec(name).family == "timm"
    assert get_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5) == get_spec("efficientnet_lite0").std
    assert get_spec("resnet50").mean == pytest.approx((0.485, 0.456, 0.406))
    assert get_spec("inception_v3").min_image_size == 75
    assert get_spec("xception").extra["timm_name"] == "legacy_xception"
    # Any other timm name passes through; nonsense names still fail listing valid ones.
    assert get_spec("test_resnet").extra["timm_name"] == "test_resnet"
    with pytest.raises(ValueError, match="registered models"):
        get_spec("no_such_net")


@pytest.mark.parametrize("name", ["resnet18", "inception_v3", "xception", "test_efficientnet"])
def test_param_groups_run_stem_to_head_and_cover_every_parameter_once(name):
    model = create_model(name, num_classes=4)
    groups = model.param_groups()
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[-1][0] == "head" and [id(p) for p in groups[-1][1]] == [id(p) for p in model.get_classifier().parameters()]
    stem = dict(model.named_parameters())
    first = next(k for k, v in stem.items() if v is groups[0][1][0])
    assert first == next(iter(stem))  # first group holds the stem's first conv
    assert model.get_classifier().out_features == 4


def test_lite0_package_weights_classify_real_photos_correctly(offline):
    model = create_model("efficientnet_lite0", num_classes=1000).eval()
    spec = get_spec("efficientnet_lite0")
    info = load_pretrained(model, spec)
    assert info["source"] == "package" and info["head_loaded"]
    assert info["sha256"] == sha256_file(info["path"])
    pre = Preprocess(spec.mean, spec.std, 3, (224, 224))
    with torch.no_grad():
        cat = model(pre(torch.from_numpy(skdata.chelsea())[None])).argmax(1).item()
        coffee = model(pre(torch.from_numpy(skdata.coffee())[None])).argmax(1).item()
    assert (cat, coffee) == (285, 967)  # Egyptian cat, espresso


@pytest.mark.parametrize("name,suffix", [("resnet18", ".safetensors"), ("inception_v3", ".pth"),
                                         ("xception", ".safetensors"), ("resnet50", ".pth"),
                                         ("vgg16", ".safetensors"), ("efficientnet_lite1", ".pth")])
def test_weights_file_loads_back_bit_exactly_with_a_fresh_head(tmp_path, offline, name, suffix):
    path = tmp_path / f"w{suffix}"
    saved = random_timm_weights(get_spec(name).extra["timm_name"], path)
    torch.manual_seed(123)  # a different init, so equality can only come from the file
    model = create_model(name, num_classes=3)
    info = load_pretrained(model, get_spec(name), str(path))
    own = model.net.state_dict()
    classifier = {k for k in own if own[k].shape != saved[k].shape}
    assert classifier and all(k.startswith(("fc.", "head.fc.", "classifier.")) for k in classifier)
    assert all(torch.equal(own[k], saved[k]) for k in own if k not in classifier)
    assert info == {"source": "file", "path": str(path), "sha256": sha256_file(path), "head_loaded": False}


def test_run_model_file_loads_with_its_head(tmp_path):
    first = create_model("test_efficientnet", num_classes=3)
    save_model(first, tmp_path / "model.safetensors")  # keys carry the wrapper's "net." prefix
    second = create_model("test_efficientnet", num_classes=3)
    info = load_pretrained(second, get_spec("test_efficientnet"), str(tmp_path / "model.safetensors"))
    assert info["head_loaded"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_hub_cache_file_is_used_offline(offline):
    spec = get_spec("xception")
    target = offline / "hub" / "checkpoints" / Path(spec.extra["url"]).name
    target.parent.mkdir(parents=True)
    saved = random_timm_weights("legacy_xception", target.with_suffix(".pth"))
    target.with_suffix(".pth").rename(target)
    model = create_model("xception", num_classes=3)
    info = load_pretrained(model, spec)
    assert info["source"] == "hub-cache" and info["path"] == str(target)
    assert torch.equal(model.net.conv1.weight, saved["conv1.weight"])


def test_weights_of_another_architecture_fail_clearly(tmp_path):
    random_timm_weights("resnet18", tmp_path / "r18.safetensors")
    with pytest.raises(WeightsError, match="does not fit this model"):
        load_pretrained(create_model("resnet50", 3), get_spec("resnet50"), str(tmp_path / "r18.safetensors"))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": object()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused to load"):
        load_pretrained(create_model("resnet18", 3), get_spec("resnet18"), str(tmp_path / "evil.pt"))


def test_unavailable_pretrained_weights_stop_the_run(csv_dataset, tmp_path, offline):
    config = TrainConfig(data_dir=str(csv_dataset / "train"), model="resnet18", strategy="finetune",
                         pretrained=True, epochs=1, image_size=32, precision="fp32")
    with pytest.raises(WeightsError) as err:
        fit(config, tmp_path / "run", log=lambda _: None)
    message = str(err.value)
    for option in ("--weights PATH", "weight package", "hub cache", "download"):
        assert option in message
    assert "random init" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "run.json").exists()


def test_image_size_respects_backbone_minimum_and_grey_becomes_rgb(csv_dataset):
    data = load_dataset(csv_dataset / "train")
    idx = torch.arange(len(data.images))
    base = TrainConfig(data_dir=str(csv_dataset / "train"), model="inception_v3", strategy="finetune", pretrained=True)
    with pytest.raises(ImgclsError, match="minimum of 75"):
        resolve_preprocess(base.replace(image_size=64), data, idx)
    pre, info = resolve_preprocess(base, data, idx)  # 16 px data: raised to the 96 px default
    assert info["image_size"] == [96, 96] and info["in_chans"] == 3 and data.channels == 1
    x = pre(data.images[:2])
    assert x.shape == (2, 3, 96, 96)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    grey = data.images[:1].float().div(255).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grey, size=(96, 96), mode="bilinear", align_corners=False)
    assert torch.allclose(x[:1, :1], (expected - 0.5) / 0.5, atol=1e-6)  # inception: mean = std = 0.5
    assert np.allclose(info["mean"], [0.5] * 3)
