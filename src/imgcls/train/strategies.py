"""Transfer strategies: which parameter groups train, at which learning rate, from which epoch.

Each strategy is one class registered by name; the rest of the package asks the strategy object
(`get_strategy(config.strategy)`) and never compares names. A new strategy is one subclass of
Strategy with `@register_strategy`, plus its tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn

from imgcls.config import BN_STATS, SMALL_DATA_BELOW, TrainConfig
from imgcls.errors import ImgclsError, OptionError
from imgcls.models.freeze import freeze_all_but, param_groups

# The --strategy value that asks the advisor (imgcls.advise) to pick one of the registered strategies.
AUTO = "auto"

# Head probe epochs when --head-probe-epochs is auto: a linear head on cached features converges
# in a few hundred steps, and an epoch costs milliseconds.
HEAD_PROBE_EPOCHS = 30


class GroupPlan(NamedTuple):
    """One parameter group of a plan, stem to head; lr None: frozen."""

    name: str
    params: list[nn.Parameter]
    lr: float | None


class Strategy:
    """What a strategy decides; the defaults are those of training every layer it is given."""

    name: str = ""
    transfers: bool = True
    """Starts from learned weights (--pretrained or --weights)."""
    tunes_backbone: bool = False
    """Trains pretrained backbone layers: small data then keeps their BatchNorm statistics, and
    the new head is first fitted on frozen features (the head probe of LP-FT)."""

    def check(self, config: TrainConfig) -> None:
        """Refuse combinations that cannot mean what the user wants."""
        if config.bn_stats not in BN_STATS:
            raise OptionError(f"unknown --bn-stats {config.bn_stats!r}; valid: {', '.join(BN_STATS)}")
        if not self.transfers and config.pretrained:
            others = " / ".join(n for n in strategy_names() if get_strategy(n).transfers)
            raise ImgclsError(f"--strategy {self.name} trains from random init; drop --pretrained or pick {others}")
        if self.transfers and not (config.pretrained or config.weights):
            raise ImgclsError(f"--strategy {self.name} transfers learned weights: "
                              "add --pretrained or --weights PATH (or use --strategy scratch)")

    def group_plan(self, model: nn.Module, config: TrainConfig) -> list[GroupPlan]:
        """Every group with the lr it trains at during the run, None for frozen throughout."""
        raise NotImplementedError

    def epoch_plan(self, model: nn.Module, config: TrainConfig, epoch: int) -> list[GroupPlan]:
        """The plan at `epoch` (0-based): a pure function of the epoch, so a resume freezes the same.
        `config.warmup_epochs` must be resolved (see warmup_epochs)."""
        return self.group_plan(model, config)

    def first_representative_epoch(self, config: TrainConfig) -> int:
        """The first epoch (0-based) that costs what every later one costs: the budget is sized
        from it and from those after it. `config.warmup_epochs` must be resolved."""
        return 0

    def bn_stats(self, config: TrainConfig, n_train: int) -> str:
        """--bn-stats auto: keep the pretrained BatchNorm statistics when tuning a backbone on little
        data (batch statistics of a few hundred images of a distant domain both differ from the
        pretrained ones and are noisy); with plenty of data they adapt to the new domain."""
        if config.bn_stats != "auto":
            return config.bn_stats
        return "frozen" if self.tunes_backbone and n_train < SMALL_DATA_BELOW else "train"

    def head_probe_epochs(self, config: TrainConfig, bn_stats: str) -> int:
        """Epochs that fit the new head on cached frozen features before the backbone trains (LP-FT).

        auto (None): a probe when the pretrained BatchNorm statistics are kept, none when they
        adapt: the probe's features are normalised with the pretrained statistics, and once batch
        statistics of a distant domain take over, its head no longer fits them.
        """
        if not self.tunes_backbone:
            return 0
        if config.head_probe_epochs is not None:
            return config.head_probe_epochs
        return HEAD_PROBE_EPOCHS if bn_stats == "frozen" else 0

    def warmup_epochs(self, config: TrainConfig, head_probe_epochs: int) -> int:
        """Head-only epochs on images before the rest trains; only finetune has them."""
        return 0

    def uses_feature_cache(self, config: TrainConfig) -> bool:
        """Whether every epoch trains on backbone features computed once (augmentation cannot apply)."""
        return False

    def run_record(self, config: TrainConfig) -> dict:
        """What run.json records of the resolved choices beyond the common ones."""
        return {}


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make the strategy available as --strategy cls.name."""
    _REGISTRY[cls.name] = cls()
    return cls


def strategy_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OptionError(f"unknown strategy {name!r}; valid: {', '.join(_REGISTRY)}") from None


def default_freeze_stages(n_body_groups: int) -> int:
    """Freeze the stem-side half: early filters (edges, textures) transfer across domains."""
    return max(1, n_body_groups // 2)


def _body_and_head(model: nn.Module) -> tuple[list[tuple[str, list[nn.Parameter]]], tuple[str, list[nn.Parameter]]]:
    groups = param_groups(model)
    return groups[:-1], groups[-1]


@register_strategy
class Head(Strategy):
    """The backbone stays as it is; only the new classifier trains."""

    name = "head"

    def group_plan(self, model: nn.Module, config: TrainConfig) -> list[GroupPlan]:
        body, head = _body_and_head(model)
        return [GroupPlan(n, ps, None) for n, ps in body] + [GroupPlan(*head, config.lr)]

    def uses_feature_cache(self, config: TrainConfig) -> bool:
        return config.cache_features


@register_strategy
class Partial(Strategy):
    """The stem-side stages stay frozen; the rest trains at the backbone lr, the head at lr."""

    name = "partial"
    tunes_backbone = True

    def group_plan(self, model: nn.Module, config: TrainConfig) -> list[GroupPlan]:
        body, head = _body_and_head(model)
        k = config.freeze_stages if config.freeze_stages is not None else default_freeze_stages(len(body))
        if not 0 <= k <= len(body):
            raise ImgclsError(f"--freeze-stages {k}: this model has {len(body)} stages below the head")
        backbone_lr = config.lr * config.backbone_lr_mult
        return ([GroupPlan(n, ps, None if i < k else backbone_lr) for i, (n, ps) in enumerate(body)]
                + [GroupPlan(*head, config.lr)])


@register_strategy
class Scratch(Strategy):
    """Random init; every group trains at lr."""

    name = "scratch"
    transfers = False

    def group_plan(self, model: nn.Module, config: TrainConfig) -> list[GroupPlan]:
        return [GroupPlan(n, ps, config.lr) for n, ps in param_groups(model)]


@register_strategy
class Finetune(Strategy):
    """Everything trains, the backbone at lr x backbone_lr_mult, after head-only warm-up epochs."""

    name = "finetune"
    tunes_backbone = True

    def group_plan(self, model: nn.Module, config: TrainConfig) -> list[GroupPlan]:
        body, head = _body_and_head(model)
        backbone_lr = config.lr * config.backbone_lr_mult
        return [GroupPlan(n, ps, backbone_lr) for n, ps in body] + [GroupPlan(*head, config.lr)]

    def epoch_plan(self, model: nn.Module, config: TrainConfig, epoch: int) -> list[GroupPlan]:
        if config.warmup_epochs is None:
            raise ValueError("epoch_plan needs a resolved warmup_epochs (Strategy.warmup_epochs)")
        plan = self.group_plan(model, config)
        if epoch >= config.warmup_epochs:
            return plan
        return [g._replace(lr=None) for g in plan[:-1]] + plan[-1:]

    def first_representative_epoch(self, config: TrainConfig) -> int:
        # A warm-up epoch trains only the head and would promise far more epochs than fit.
        return config.warmup_epochs

    def warmup_epochs(self, config: TrainConfig, head_probe_epochs: int) -> int:
        """auto (None): none after a head probe (the probe is the warm-up), else 1."""
        if config.warmup_epochs is not None:
            return config.warmup_epochs
        return 0 if head_probe_epochs else 1

    def run_record(self, config: TrainConfig) -> dict:
        return {"warmup_epochs": config.warmup_epochs}


def asks_the_advisor(config: TrainConfig) -> bool:
    """--strategy auto: the advisor measures the data and picks the strategy."""
    return config.strategy == AUTO


def check_strategy(config: TrainConfig) -> Strategy:
    """The config's strategy, once its options are known to make sense together."""
    strategy = get_strategy(config.strategy)
    strategy.check(config)
    return strategy


def param_groups_for(model: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimizer groups {"name", "params", "lr"}: every group that trains at some point of the run."""
    plan = [g for g in check_strategy(config).group_plan(model, config) if g.lr is not None]
    # build_optimizer keeps only params with requires_grad: mark all that will ever train.
    freeze_all_but(model, {g.name for g in plan})
    return [{"name": g.name, "params": g.params, "lr": g.lr} for g in plan]


def apply_epoch(model: nn.Module, config: TrainConfig, epoch: int) -> None:
    """Set requires_grad for `epoch` (0-based) as the strategy's plan says."""
    plan = get_strategy(config.strategy).epoch_plan(model, config, epoch)
    freeze_all_but(model, {g.name for g in plan if g.lr is not None})


def freeze_backbone(model: nn.Module) -> None:
    """Only the classifier trains: what frozen-backbone features are computed under."""
    freeze_all_but(model, {param_groups(model)[-1][0]})
