"""The four transfer strategies: what trains, what stays bit-identical, at which learning rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgcls.config import TrainConfig
from imgcls.errors import ImgclsError
from imgcls.models import create_model
from imgcls.models.io import sha256_file
from imgcls.train.checkpoint import load_checkpoint
from imgcls.train.optim import build_optimizer
from imgcls.train.runner import fit
from imgcls.train.strategies import Strategy, get_strategy, param_groups_for, register_strategy, strategy_names

ARCH = "test_efficientnet"  # 100k parameters, real BatchNorm stages: fast enough for 2 cores


@pytest.fixture
def start_weights(tmp_path: Path) -> Path:
    """A random-init backbone saved as the pretrained starting point."""
    torch.manual_seed(7)
    model = create_model(ARCH, num_classes=1000)
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    return path


def config_for(data: Path, weights: Path, **changes) -> TrainConfig:
    base = TrainConfig(data_dir=str(data / "train"), model=ARCH, weights=str(weights), image_size=32,
                       epochs=2, batch_size=8, lr=0.02, precision="fp32", channels_last=False,
                       val_fraction=0.25, bn_stats="train")  # the freezing tests watch BN statistics move
    return base.replace(**changes)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    """The model after the last epoch (the resume checkpoint), keys without the wrapper prefix."""
    return {k.removeprefix("net."): v for k, v in load_checkpoint(run / "checkpoint.pt")["model"].items()}


def group_of_each_key(n_frozen: int) -> dict[str, bool]:
    """state-dict key -> frozen? (parameters by group; BN buffers follow their module's parameters)."""
    model = create_model(ARCH, num_classes=3)
    names = {id(p): n for n, p in model.net.named_parameters()}
    frozen_params = {names[id(p)] for _, ps in model.param_groups()[:n_frozen] for p in ps}
    frozen = {}
    for key in model.net.state_dict():
        module = key.rsplit(".", 1)[0]
        frozen[key] = key in frozen_params or f"{module}.weight" in frozen_params
    return frozen


def start_state(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(weights))


@pytest.mark.parametrize("strategy,n_frozen", [("partial", 3), ("head", 6)])
def test_frozen_params_and_bn_buffers_stay_bit_identical(csv_dataset, start_weights, tmp_path, strategy, n_frozen):
    config = config_for(csv_dataset, start_weights, strategy=strategy, freeze_stages=3, cache_features=False)
    fit(config, tmp_path / "run", log=lambda _: None)
    before, after = start_state(start_weights), final_state(tmp_path / "run")
    frozen = group_of_each_key(n_frozen)
    assert sum(frozen.values()) > 10
    for key, is_frozen in frozen.items():
        if key.startswith("classifier"):
            continue  # fresh 3-class head: no counterpart in the start weights
        if is_frozen:
            assert torch.equal(before[key], after[key]), f"{key} changed although frozen"
        elif key.endswith(("weight", "running_mean")):
            assert not torch.equal(before[key], after[key]), f"{key} did not train"


def test_finetune_trains_only_the_head_during_warmup_then_everything(csv_dataset, start_weights, tmp_path):
    # Adapting statistics (bn_stats "train"): auto makes no head probe, so one warm-up epoch on images.
    base = config_for(csv_dataset, start_weights, strategy="finetune")
    fit(base.replace(epochs=1), tmp_path / "warm", log=lambda _: None)
    fit(base.replace(epochs=2), tmp_path / "full", log=lambda _: None)
    before = start_state(start_weights)
    warm, full = final_state(tmp_path / "warm"), final_state(tmp_path / "full")
    body = [k for k in before if not k.startswith("classifier")]
    assert all(torch.equal(before[k], warm[k]) for k in body)  # BN buffers included
    assert not torch.equal(before["conv_stem.weight"], full["conv_stem.weight"])
    assert not torch.equal(before["bn1.running_mean"], full["bn1.running_mean"])
    run = json.loads((tmp_path / "full" / "run.json").read_text())
    assert run["augmentation"] == {"flip": True, "shift": 2, "erase": 0.0}  # auto below 10k images
    assert run["head_probe"] is None and run["warmup_epochs"] == 1


def first_epoch(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("strategy", ["finetune", "partial"])
def test_the_head_is_fitted_on_cached_features_before_the_backbone_trains(csv_dataset, start_weights, tmp_path,
                                                                          strategy):
    base = config_for(csv_dataset, start_weights, strategy=strategy, epochs=1, freeze_stages=3, bn_stats="frozen",
                      backbone_lr_mult=0.01, head_probe_epochs=None)  # auto: a probe, statistics are kept
    probed = fit(base, tmp_path / "probed", log=lambda _: None)
    plain = fit(base.replace(head_probe_epochs=0), tmp_path / "plain", log=lambda _: None)
    assert plain["head_probe"] is None and probed["head_probe"]["epochs"] == 30
    assert probed["head_probe"]["train_loss"] < math.log(3)  # below a head that knows nothing of 3 classes
    assert probed["train_seconds"] >= probed["head_probe"]["seconds"]  # the probe counts against a budget
    # The backbone's first epoch starts under a head that already fits, not a random one (a slow
    # backbone, so the epoch mostly shows the head it started with).
    assert first_epoch(tmp_path / "probed")["train_loss"] < first_epoch(tmp_path / "plain")["train_loss"]


@pytest.mark.parametrize("strategy,bn_stats,explicit,expected", [
    ("finetune", "frozen", None, 30), ("partial", "frozen", None, 30), ("finetune", "train", None, 0),
    ("finetune", "train", 12, 12), ("finetune", "frozen", 0, 0), ("head", "frozen", None, 0),
    ("scratch", "frozen", 12, 0),
])
def test_auto_head_probe_only_where_the_pretrained_statistics_are_kept(strategy, bn_stats, explicit, expected):
    config = TrainConfig(data_dir="x", model=ARCH, strategy=strategy, head_probe_epochs=explicit)
    assert get_strategy(strategy).head_probe_epochs(config, bn_stats) == expected


def test_auto_warmup_is_the_probe_or_one_epoch_on_images():
    config = TrainConfig(data_dir="x", model=ARCH, strategy="finetune")
    finetune = get_strategy("finetune")
    assert finetune.warmup_epochs(config, head_probe_epochs=30) == 0
    assert finetune.warmup_epochs(config, head_probe_epochs=0) == 1
    assert finetune.warmup_epochs(config.replace(warmup_epochs=2), head_probe_epochs=30) == 2  # explicit wins
    assert all(get_strategy(name).warmup_epochs(config.replace(warmup_epochs=2), 0) == 0
               for name in ("head", "partial", "scratch"))  # a head-only warm-up is finetune's alone


def test_a_resumed_run_keeps_its_head_probe_and_does_not_repeat_it(csv_dataset, start_weights, tmp_path):
    config = config_for(csv_dataset, start_weights, strategy="finetune", epochs=2, head_probe_epochs=30)
    reference = fit(config, tmp_path / "reference", log=lambda _: None)

    def stop_after_epoch_1(line: str) -> None:
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, tmp_path / "run", log=stop_after_epoch_1)
    lines: list[str] = []
    resumed = fit(config, tmp_path / "run", log=lines.append)
    assert any(line.startswith("resuming after epoch 1") for line in lines)
    assert not any(line.startswith("head probe") for line in lines)
    assert resumed["head_probe"]["val_acc"] == reference["head_probe"]["val_acc"]
    ref, run = final_state(tmp_path / "reference"), final_state(tmp_path / "run")
    assert all(torch.allclose(ref[k].double(), run[k].double(), atol=1e-6) for k in ref)


@pytest.mark.parametrize("bn_stats", ["frozen", "auto"])  # auto: 27 training images are small data
def test_frozen_bn_stats_keep_the_pretrained_running_statistics_while_everything_trains(
        csv_dataset, start_weights, tmp_path, bn_stats):
    config = config_for(csv_dataset, start_weights, strategy="finetune", warmup_epochs=0, bn_stats=bn_stats)
    run = fit(config, tmp_path / "run", log=lambda _: None)
    assert run["bn_stats"] == "frozen"
    before, after = start_state(start_weights), final_state(tmp_path / "run")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10 and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"])  # BN affine parameters still train
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])


@pytest.mark.parametrize("strategy,n_train,expected", [
    ("finetune", 900, "frozen"), ("partial", 9_999, "frozen"), ("finetune", 10_000, "train"),
    ("partial", 54_000, "train"), ("scratch", 900, "train"), ("head", 900, "train"),
])
def test_auto_bn_stats_keep_pretrained_statistics_only_when_transferring_to_small_data(strategy, n_train, expected):
    config = TrainConfig(data_dir="x", model=ARCH, strategy=strategy, bn_stats="auto",
                         weights=None if strategy == "scratch" else "w.safetensors")
    assert get_strategy(strategy).bn_stats(config, n_train) == expected
    for explicit in ("train", "frozen"):  # an explicit choice is never overridden
        assert get_strategy(strategy).bn_stats(config.replace(bn_stats=explicit), n_train) == explicit


@pytest.mark.parametrize("strategy,expected", [
    ("scratch", {f"stage{i}": 0.02 for i in range(6)} | {"head": 0.02}),
    ("head", {"head": 0.02}),
    ("partial", {"stage2": 0.005, "stage3": 0.005, "stage4": 0.005, "stage5": 0.005, "head": 0.02}),
    ("finetune", {f"stage{i}": 0.005 for i in range(6)} | {"head": 0.02}),
])
def test_optimizer_holds_the_intended_learning_rate_per_group(strategy, expected):
    model = create_model(ARCH, num_classes=3)
    config = TrainConfig(data_dir="x", model=ARCH, strategy=strategy, lr=0.02, backbone_lr_mult=0.25,
                         freeze_stages=2, weights=None if strategy == "scratch" else "w.safetensors")
    optimizer = build_optimizer(param_groups_for(model, config), weight_decay=0.05)
    lrs = {}
    for group in optimizer.param_groups:
        lrs.setdefault(group["name"].removesuffix(".no_decay"), set()).add(group["lr"])
    assert lrs == {name: {lr} for name, lr in expected.items()}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, params in model.param_groups():
        assert all((id(p) in in_optimizer) == (name in expected) for p in params)


def test_cached_features_give_the_same_head_as_the_full_forward(csv_dataset, start_weights, tmp_path):
    base = config_for(csv_dataset, start_weights, strategy="head", augment="none", epochs=3)
    fit(base.replace(cache_features=True), tmp_path / "cached", log=lambda _: None)
    fit(base.replace(cache_features=False), tmp_path / "full", log=lambda _: None)
    cached, full = final_state(tmp_path / "cached"), final_state(tmp_path / "full")
    assert not torch.allclose(cached["classifier.weight"], start_like_head(), atol=1e-3)
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(cached[key], full[key], atol=1e-5), key
    run = json.loads((tmp_path / "cached" / "run.json").read_text())
    assert run["feature_cache"]["dim"] == create_model(ARCH, 3).num_features
    metrics = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_acc"] for m in metrics] == [m["val_acc"] for m in ref]
    assert [m["train_loss"] for m in metrics] == pytest.approx([m["train_loss"] for m in ref], abs=1e-4)


def start_like_head() -> torch.Tensor:
    """The head a run starts from: same seed (0) as fit's model construction."""
    torch.manual_seed(0)
    return create_model(ARCH, num_classes=3).get_classifier().weight.detach()


def test_run_records_where_the_weights_came_from(csv_dataset, start_weights, tmp_path):
    run = fit(config_for(csv_dataset, start_weights, strategy="head", epochs=1), tmp_path / "run", log=lambda _: None)
    assert run["weights"]["path"] == str(start_weights)
    assert run["weights"]["sha256"] == sha256_file(start_weights)
    head_size = sum(p.numel() for p in create_model(ARCH, 3).get_classifier().parameters())
    assert run["strategy"] == "head" and run["trainable_parameters"] == head_size


@pytest.mark.parametrize("changes,message", [
    ({"strategy": "scratch", "pretrained": True, "weights": None}, "drop --pretrained"),
    ({"strategy": "head", "weights": None}, "add --pretrained or --weights"),
    ({"strategy": "partial", "freeze_stages": 9}, "has 6 stages"),
    ({"strategy": "unfreeze-all"}, "valid: head, partial, scratch, finetune"),
    ({"bn_stats": "sometimes"}, "valid: auto, train, frozen"),
])
def test_contradictory_strategy_options_fail_clearly(csv_dataset, start_weights, tmp_path, changes, message):
    with pytest.raises((ImgclsError, ValueError), match=message):
        fit(config_for(csv_dataset, start_weights).replace(**changes), tmp_path / "run", log=lambda _: None)


def test_the_readme_lpft_recipe_runs_from_the_cli(csv_dataset, start_weights, tmp_path):
    """Probe on cached features, then fine-tune from it with frozen BN statistics and erasing."""
    from imgcls.cli import main
    common = ["--model", ARCH, "--image-size", "32", "--batch-size", "8", "--precision", "fp32",
              "--val-fraction", "0.25", "--no-channels-last"]
    probe, lpft = tmp_path / "probe", tmp_path / "lpft"
    assert main(["train", str(csv_dataset / "train"), "--out", str(probe), "--weights", str(start_weights),
                 "--strategy", "head", "--epochs", "3", "--lr", "3e-2", "--augment", "none", *common]) == 0
    assert main(["train", str(csv_dataset / "train"), "--out", str(lpft), "--strategy", "finetune",
                 "--weights", str(probe / "model.safetensors"), "--warmup-epochs", "0", "--backbone-lr-mult", "1",
                 "--lr", "1e-3", "--epochs", "2", "--bn-stats", "frozen", "--augment", "flip-shift-erase",
                 *common]) == 0
    run = json.loads((lpft / "run.json").read_text())
    assert run["weights"]["head_loaded"] and run["augmentation"] == {"flip": True, "shift": 2, "erase": 0.5}
    before, after = start_state(start_weights), final_state(lpft)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("running_mean"))
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])


def test_the_registry_lists_every_strategy_and_refuses_unknown_names():
    assert strategy_names() == ("head", "partial", "scratch", "finetune")
    assert all(get_strategy(name).name == name for name in strategy_names())
    with pytest.raises(ValueError, match="unknown strategy 'lora'; valid: head, partial, scratch, finetune"):
        get_strategy("lora")


@pytest.mark.parametrize("strategy,warmup,first", [("finetune", 2, 2), ("finetune", 0, 0), ("head", 2, 0),
                                                    ("partial", 2, 0), ("scratch", 2, 0)])
def test_warmup_epochs_are_not_representative_for_the_budget(strategy, warmup, first):
    config = TrainConfig(data_dir="x", model=ARCH, strategy=strategy, warmup_epochs=warmup)
    assert get_strategy(strategy).first_representative_epoch(config) == first


def test_finetune_plans_the_backbone_frozen_during_warmup_then_at_the_backbone_lr():
    model = create_model(ARCH, num_classes=3)
    config = TrainConfig(data_dir="x", model=ARCH, strategy="finetune", lr=0.02, backbone_lr_mult=0.25,
                         warmup_epochs=1)
    finetune = get_strategy("finetune")
    warm, after = finetune.epoch_plan(model, config, 0), finetune.epoch_plan(model, config, 1)
    assert [g.lr for g in warm] == [None] * 6 + [0.02]
    assert [g.lr for g in after] == [0.005] * 6 + [0.02]
    with pytest.raises(ValueError, match="resolved warmup_epochs"):
        finetune.epoch_plan(model, config.replace(warmup_epochs=None), 0)


def test_a_new_strategy_is_one_registered_class(csv_dataset, start_weights, tmp_path, monkeypatch):
    """A strategy that trains only the last stage and the head: nothing else in the package changes."""
    from imgcls.train import strategies

    class LastStage(Strategy):
        name = "last-stage"
        tunes_backbone = True

        def group_plan(self, model, config):
            groups = strategies.param_groups(model)
            return ([strategies.GroupPlan(n, ps, None) for n, ps in groups[:-2]]
                    + [strategies.GroupPlan(n, ps, config.lr) for n, ps in groups[-2:]])

    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))
    register_strategy(LastStage)
    run = fit(config_for(csv_dataset, start_weights, strategy="last-stage", epochs=1, head_probe_epochs=0),
              tmp_path / "run", log=lambda _: None)
    before, after = start_state(start_weights), final_state(tmp_path / "run")
    frozen = group_of_each_key(n_frozen=5)
    assert all(torch.equal(before[k], after[k]) for k, is_frozen in frozen.items() if is_frozen)
    assert not torch.equal(before["conv_head.weight"], after["conv_head.weight"])
    assert run["strategy"] == "last-stage"


def test_a_fine_tune_that_only_gets_worse_leaves_the_head_probe_as_the_model(csv_dataset, start_weights, tmp_path):
    from safetensors.torch import load_file

    # The probe trains the head at lr; the backbone at 25x that wrecks every fine-tune epoch.
    config = config_for(csv_dataset, start_weights, strategy="finetune", epochs=2, bn_stats="frozen",
                        head_probe_epochs=30, backbone_lr_mult=25)
    run = fit(config, tmp_path / "run", log=lambda _: None)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(e["val_acc"] <= run["head_probe"]["val_acc"] for e in epochs)
    assert run["best_model"] == "head_probe" and run["best_epoch"] == 0
    assert run["best_val_acc"] == run["head_probe"]["val_acc"]
    saved = {k.removeprefix("net."): v for k, v in load_file(tmp_path / "run" / "model.safetensors").items()}
    start = start_state(start_weights)
    backbone = [k for k in start if not k.startswith("classifier")]
    assert backbone and all(torch.equal(saved[k], start[k]) for k in backbone)  # the probe's: backbone untouched
    assert any(not torch.equal(a, b) for a, b in zip(final_state(tmp_path / "run").values(), saved.values()))
