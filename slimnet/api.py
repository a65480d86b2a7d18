"""The plain-PyTorch entry points: ``prune`` a model in place and get a report back.

No Lightning, no Hydra: ``graph`` finds the channel groups, ``plan`` decides from |γ|, ``surgery`` cuts.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimnet._modes import preserved_modes
from slimnet.graph import trace_channel_groups
from slimnet.measure import count_flops
from slimnet.plan import PrunePlan, decide, groups_summary
from slimnet.surgery import apply_plan


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Channels per conv (filters), linear (outputs) and BatchNorm (entries), by module name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, _ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
        elif isinstance(m, _BatchNorm):
            widths[name] = m.num_features
    return widths


def current_plan(model: nn.Module) -> PrunePlan | None:
    """The plan a model was cut by (composed over passes), or None if it was never pruned."""
    return getattr(model, "slimnet_plan", None)


def prune(
    model: nn.Module,
    example_inputs,
    *,
    thresh: float | None = None,
    percent: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    leaf_modules=(),
) -> dict:
    """Remove the channels whose BatchNorm |γ| is small, for real, in place.

    Args:
        model: any traceable ``nn.Module`` with BatchNorm layers.
        example_inputs: a tensor (or tuple) of the shape the model takes; values are not used.
        thresh: keep channels with |γ| > thresh (absolute; wins over ``percent``).
        percent: prune this fraction of all BatchNorm channels, ranked globally by |γ| (Liu et al.).
        min_channels: no layer keeps fewer channels than this (the paper's code could empty a layer).
        round_to: keep channel counts a multiple of this, rounding up.
        leaf_modules: module classes kept as black boxes when tracing.

    Returns:
        a report: ``flops_before/after``, ``params_before/after``, ``threshold``, ``channels``
        (module -> [before, after] for every layer that changed), ``groups`` and ``warnings``.
    """
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: there is no γ to slim by. "
                         "Network slimming needs BatchNorm after the convs you want to prune.")
    flops_before, params_before = count_flops(model, example_inputs)
    widths_before = layer_widths(model)
    with preserved_modes(model):
        graph = trace_channel_groups(model, example_inputs, leaf_modules)
        for message in graph.warnings:
            warnings.warn(f"prune: {message}; the channels it touches are kept whole", stacklevel=2)
        decision = decide(graph, model, thresh=thresh, percent=percent, min_channels=min_channels,
                          round_to=round_to)
        apply_plan(model, decision.plan)
    previous = current_plan(model)
    model.slimnet_plan = previous.then(decision.plan) if previous is not None else decision.plan
    flops_after, params_after = count_flops(model, example_inputs)
    widths_after = layer_widths(model)
    return {
        "threshold": decision.threshold,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "params_before": params_before,
        "params_after": params_after,
        "channels": {n: [widths_before[n], w] for n, w in widths_after.items() if w != widths_before[n]},
        "groups": groups_summary(graph, decision.kept),
        "floored": decision.floored,
        "warnings": graph.warnings,
        "plan": model.slimnet_plan,
    }
