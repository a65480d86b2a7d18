"""Optimizers and per-step learning-rate schedules for one training phase.

Each phase (sparse training, then fine-tuning after surgery) builds its own optimizer and a schedule
that spans exactly that phase's steps, so fine-tuning starts from its own learning rate rather than
wherever the sparse phase's schedule had decayed to.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
SCHEDULES = ("onecycle", "multistep", "cosine", "constant")


def build_optimizer(params, name: str = "sgd", lr: float = 0.1, weight_decay: float = 1e-4,
                    momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int,
                   milestones=(0.5, 0.75), gamma: float = 0.1, pct_start: float = 0.25) -> LRScheduler:
    """A schedule stepped once per optimizer step over ``total_steps``.

    ``multistep`` divides the rate by ``1/gamma`` at each milestone, given as fractions of the phase
    (Liu et al. 2017: ÷10 at 50% and 75%); ``onecycle`` warms up over ``pct_start`` then anneals.
    """
    total_steps = max(int(total_steps), 1)
    if schedule == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=pct_start)
    if schedule == "multistep":
        steps = sorted(int(m * total_steps) for m in milestones)
        return LambdaLR(optimizer, lambda step: gamma ** sum(step >= s for s in steps))
    if schedule == "cosine":
        return LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    if schedule == "constant":
        return LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
