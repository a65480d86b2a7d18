"""Apply a ``PrunePlan`` to modules: slice their parameters for real, leaving a smaller dense model.

Each module axis in the plan is cut with ``index_select``; the module's size attributes
(``out_channels``, ``in_features``, ``num_features``, ``groups``…) are updated with the tensors, so the
module still describes its weights. Parameters are replaced by new ``nn.Parameter`` objects that keep
``requires_grad``; callers that hold an optimizer must rebuild it (``SlimModule`` does).

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimnet.plan import PrunePlan


def _slice_param(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    data = param.data.index_select(dim, index.to(param.device))
    if isinstance(param, nn.Parameter):
        setattr(module, name, nn.Parameter(data, requires_grad=param.requires_grad))
    else:  # a buffer
        setattr(module, name, data)


def _cut_conv(m: _ConvNd, kind: str, index: torch.Tensor) -> None:
    if kind == "out":
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.out_channels = len(index)
    elif kind == "in":
        _slice_param(m, "weight", index, 1)
        m.in_channels = len(index)
    elif kind == "dw":  # depthwise: filter c reads channel c only
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.in_channels = m.out_channels = m.groups = len(index)
    else:
        raise ValueError(f"cannot cut axis {kind!r} of a conv")


def _cut_linear(m: nn.Linear, kind: str, index: torch.Tensor) -> None:
    if kind == "out":
        _slice_param(m, "weight", index, 0)
        _slice_param(m, "bias", index, 0)
        m.out_features = len(index)
    elif kind == "in":
        _slice_param(m, "weight", index, 1)
        m.in_features = len(index)
    else:
        raise ValueError(f"cannot cut axis {kind!r} of a linear layer")


def _cut_norm(m: _BatchNorm, kind: str, index: torch.Tensor) -> None:
    if kind != "bn":
        raise ValueError(f"cannot cut axis {kind!r} of a norm")
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice_param(m, name, index, 0)
    m.num_features = len(index)


def _cutter(module: nn.Module):
    if isinstance(module, _ConvNd):
        return _cut_conv
    if isinstance(module, nn.Linear):
        return _cut_linear
    if isinstance(module, _BatchNorm):
        return _cut_norm
    raise TypeError(f"slimnet cannot cut a {type(module).__name__}")


def apply_plan(model: nn.Module, plan: PrunePlan) -> None:
    """Cut ``model`` in place to the widths ``plan`` keeps, counted in the model's current channels."""
    modules = dict(model.named_modules())
    missing = [name for name in plan.keep if name not in modules]
    if missing:
        raise ValueError(f"plan names modules this model does not have: {missing[:5]}; "
                         "was the plan made for another architecture or config?")
    for name, axes in plan.keep.items():
        module, cut = modules[name], _cutter(modules[name])
        for kind, idx in axes.items():
            cut(module, kind, torch.as_tensor(idx, dtype=torch.long))


def replay_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Cut a freshly built (unpruned) model to a plan's shapes, e.g. before loading pruned weights."""
    apply_plan(model, plan)
    model.slimnet_plan = plan
    return model
