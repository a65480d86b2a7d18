"""The plain-PyTorch entry points: ``prune`` a model in place and get a report back.

No Lightning, no Hydra: ``graph`` finds the channel groups, ``plan`` decides from |γ|, ``fold`` moves
what the removed channels still emit into the remaining biases, ``surgery`` cuts.
``zeroed.prune_zeroed`` runs the same steps with a plan read from zeroed filters instead of |γ|.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimnet._modes import preserved_modes
from slimnet.budget import threshold_for_flops
from slimnet.fold import InputStats, fold_removed_inputs
from slimnet.graph import ChannelGraph, trace_channel_groups
from slimnet.measure import count_flops
from slimnet.optim_state import ParamSnapshot
from slimnet.plan import PlanDecision, PrunePlan, decide, groups_summary
from slimnet.prune_report import PruneReport
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
    target_flops: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    fold_bias: bool = True,
    leaf_modules=(),
) -> dict:
    """Remove the channels whose BatchNorm |γ| is small, for real, in place.

    Args:
        model: any traceable ``nn.Module`` with BatchNorm layers.
        example_inputs: a tensor (or tuple) of the shape the model takes. With ``fold_bias`` its values
            matter a little: the removed channels' outputs are averaged over it (a batch of real data
            is best when γ is small but not zero; for γ = 0 any input gives the exact constant).
        thresh: keep channels with |γ| > thresh (absolute; wins over ``percent``).
        percent: prune this fraction of all BatchNorm channels, ranked globally by |γ| (Liu et al.).
        target_flops: keep at most this fraction of the FLOPs: the lowest |γ| threshold that fits the
            budget is searched on the model as it is (no training per probe); wins over ``percent``.
        min_channels: no layer keeps fewer channels than this (the paper's code could empty a layer).
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the (near-)constant output of removed channels, ``act(β)`` when γ → 0, into the
            bias of the layers that read them (see ``slimnet.fold``), so accuracy right after the cut
            is close to the sparse model's.
        leaf_modules: module classes kept as black boxes when tracing.

    Returns:
        a ``PruneReport``: ``flops_before/after``, ``params_before/after``, ``threshold``, ``channels``
        (module -> [before, after] for every layer that changed), ``groups``, ``warnings``, ``folded``
        (layers that absorbed removed channels' constants), ``plan`` and ``pass_plan``.

    Raises:
        ValueError: the model has no BatchNorm (nothing to slim), or the policy is invalid.
    """
    if thresh is not None and target_flops is not None:
        raise ValueError("prune: give thresh or target_flops, not both")
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise ValueError(
            f"nothing to slim: {type(model).__name__} has no BatchNorm layer, so there is no γ to rank "
            f"channels by{' (it normalises with ' + ', '.join(norms) + ')' if norms else ''}. Network slimming "
            "needs BatchNorm after the convs you want to prune. Hint: slimnet.prune_zeroed(model, x) turns "
            "filters you zeroed yourself (e.g. with torch.nn.utils.prune) into a smaller model.")

    if target_flops is not None:
        with torch.no_grad():
            found, _ = threshold_for_flops(model, example_inputs, target_flops, min_channels=min_channels,
                                           round_to=round_to, leaf_modules=leaf_modules)
        thresh, percent = (found, None) if found > -math.inf else (None, 0.0)

    def choose(graph: ChannelGraph, stats: InputStats) -> PlanDecision:
        return decide(graph, model, thresh=thresh, percent=percent, min_channels=min_channels,
                      round_to=round_to)

    return run_surgery(model, example_inputs, choose, fold_bias=fold_bias, measure_inputs=fold_bias,
                       leaf_modules=leaf_modules, caller="prune")


def _batch_size(example_inputs) -> int:
    first = example_inputs if isinstance(example_inputs, torch.Tensor) else example_inputs[0]
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1


@torch.no_grad()
def _measure(model: nn.Module, example_inputs, record: bool, stats_inputs=None) -> tuple[int, int, InputStats]:
    """FLOPs and params (batch of one, as ``count_flops``) and, if ``record``, each layer's input
    statistics in eval mode over ``stats_inputs`` (default: the whole example batch; when that is one
    sample, the FLOP-count forward records them, so no extra forward runs)."""
    stats = InputStats(model)
    shared = stats_inputs is None and _batch_size(example_inputs) == 1
    with stats.recording(enabled=record and shared):
        flops, params = count_flops(model, example_inputs)
    if record and not shared:
        inputs = example_inputs if stats_inputs is None else stats_inputs
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        with stats.recording(), preserved_modes(model):
            model.eval()
            model(*inputs)
    return flops, params, stats


def run_surgery(
    model: nn.Module,
    example_inputs,
    choose: Callable[[ChannelGraph, InputStats], PlanDecision],
    *,
    fold_bias: bool,
    measure_inputs: bool,
    stats_inputs=None,
    leaf_modules=(),
    caller: str = "prune",
) -> PruneReport:
    """Measure, trace, let ``choose`` decide a plan, fold, cut, and report: the steps every entry shares.

    ``measure_inputs``: record each layer's input statistics (needed by ``fold_bias`` and by choosers
    that look at activations), over ``stats_inputs`` if given, else over ``example_inputs``.
    """
    clock = _Clock()
    before = ParamSnapshot(model)  # lets carry_optimizer_state slice an optimizer's state afterwards
    flops_before, params_before, stats = _measure(model, example_inputs, measure_inputs, stats_inputs)
    widths_before = layer_widths(model)
    clock.lap("measure")
    with preserved_modes(model):
        graph = trace_channel_groups(model, example_inputs, leaf_modules)
        for message in graph.warnings:
            warnings.warn(f"{caller}: {message}", stacklevel=3)
        clock.lap("trace")
        decision = choose(graph, stats)
        plan = decision.plan
        clock.lap("plan")
        folded = []
        if fold_bias and plan:
            result = fold_removed_inputs(model, graph, plan, stats)
            plan.add_bias, folded = result.new_bias, result.folded
        clock.lap("fold")
        apply_plan(model, plan)
        clock.lap("cut")
    previous = current_plan(model)
    model.slimnet_plan = previous.then(plan) if previous is not None else plan
    flops_after, params_after = count_flops(model, example_inputs)
    widths_after = layer_widths(model)
    clock.lap("measure_after")
    return PruneReport(
        threshold=decision.threshold,
        flops_before=flops_before,
        flops_after=flops_after,
        params_before=params_before,
        params_after=params_after,
        channels={n: [widths_before[n], w] for n, w in widths_after.items() if w != widths_before.get(n)},
        groups=groups_summary(graph, decision.kept),
        floored=decision.floored,
        warnings=list(graph.warnings),
        folded=folded,
        # wall time per step; "surgery" is trace + plan + fold + cut (the two measure steps count FLOPs
        # for this report, and the first also records the inputs folding needs)
        seconds={**clock.laps, "surgery": sum(clock.laps[k] for k in ("trace", "plan", "fold", "cut"))},
        plan=model.slimnet_plan,
        pass_plan=plan,
        before=before,
    )


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
