"""Check a composed run config before any data is read or any epoch is trained.

Every mistake detectable from the config alone is reported here, in one line that names the key and
the fix, so a typo never costs hours of sparse training first.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from slimnet.data import DATAMODULES
from slimnet.models import list_models
from slimnet.schedules import OPTIMIZERS, SCHEDULES


class ConfigError(ValueError):
    """A run config that cannot work; the message names the key and what to set."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pruning_enabled(cfg: DictConfig) -> bool:
    p = cfg.prune
    return p.epoch is not None and any(p.get(k) is not None for k in ("thresh", "percent", "target_flops"))


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    p = cfg.prune
    if cfg.data.name not in DATAMODULES:
        raise ConfigError(f"data.name={cfg.data.name!r} is unknown; choose one of: {', '.join(DATAMODULES)}")
    if cfg.model.arch not in list_models():
        raise ConfigError(f"model.arch={cfg.model.arch!r} is unknown; choose one of: {', '.join(list_models())}")
    if p.thresh is not None and (not _number(p.thresh) or math.isnan(p.thresh) or p.thresh < 0):
        raise ConfigError(f"prune.thresh={p.thresh} must be a number >= 0 (an absolute |γ| threshold)")
    if p.percent is not None and (not _number(p.percent) or not 0 <= p.percent < 1):
        raise ConfigError(f"prune.percent={p.percent} must be in [0, 1) (the fraction of channels pruned)")
    if p.get("target_flops") is not None:
        if p.thresh is not None:
            raise ConfigError("prune.thresh and prune.target_flops are both set; keep one of them")
        if not _number(p.target_flops) or not 0 < p.target_flops <= 1:
            raise ConfigError(f"prune.target_flops={p.target_flops} must be in (0, 1] (the fraction of FLOPs kept)")
    max_epochs = cfg.trainer.max_epochs
    if p.epoch is not None:
        if not isinstance(p.epoch, int) or p.epoch < 0:
            raise ConfigError(f"prune.epoch={p.epoch} must be an integer >= 0")
        if max_epochs is not None and max_epochs >= 0 and p.epoch >= max_epochs:
            raise ConfigError(f"prune.epoch={p.epoch} must be < trainer.max_epochs={max_epochs}, "
                              "or the model is never cut; lower prune.epoch or raise trainer.max_epochs")
    if p.min_channels < 1:
        raise ConfigError(f"prune.min_channels={p.min_channels} must be >= 1 (a layer with no channel is dead)")
    if p.round_to < 1:
        raise ConfigError(f"prune.round_to={p.round_to} must be >= 1")
    for key in ("lam", "finetune_lam"):
        value = cfg.sparsity[key]
        if not _number(value) or math.isnan(value) or value < 0:
            raise ConfigError(f"sparsity.{key}={value} must be a number >= 0")
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
    for where in ("optim", "finetune"):
        schedule = cfg[where].get("schedule")
        if schedule is not None and schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule={schedule!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
