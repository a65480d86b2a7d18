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
from torch.nn.modules.conv import _ConvNd

from slimnet._modes import preserved_modes
from slimnet.budget import threshold_for_flops
from slimnet.errors import first_line
from slimnet.fold import InputStats, fold_removed_inputs
from slimnet.graph import NORM_TYPES, ChannelGraph, trace_channel_groups
from slimnet.measure import (
    count_flops,
    count_params,
    flops_from_uses,
    reads_training,
    weight_uses,
    weight_uses_from_forward,
)
from slimnet.optim_state import ParamSnapshot
from slimnet.plan import PlanDecision, PrunePlan, decide, groups_summary, restrict_to
from slimnet.prune_report import PruneReport
from slimnet.surgery import apply_plan, check_plan, transaction


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Channels per conv (filters), linear (outputs) and BatchNorm (entries), by module name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, _ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
        elif isinstance(m, NORM_TYPES):
            widths[name] = m.weight.shape[0] if getattr(m, "weight", None) is not None else m.num_features
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
    within=None,
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
            Channels tied at one |γ| (e.g. many at exactly 0) are cut lowest β first, so the budget
            is met inside the tie rather than overshot.
        min_channels: no layer keeps fewer channels than this (the paper's code could empty a layer).
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the (near-)constant output of removed channels, ``act(β)`` when γ → 0, into the
            bias of the layers that read them (see ``slimnet.fold``), so accuracy right after the cut
            is close to the sparse model's.
        leaf_modules: module classes kept as black boxes when tracing.
        within: cut only channel groups whose norms all lie in these sub-modules (a dotted name or a
            list; e.g. ``"backbone.body"`` of a traced detector trunk). Layers outside that read those
            channels lose them too; the rest of the model is left whole. None: everywhere.

    Returns:
        a ``PruneReport``: ``flops_before/after``, ``params_before/after``, ``threshold``, ``channels``
        (module -> [before, after] for every layer that changed), ``groups``, ``warnings``, ``folded``
        (layers that absorbed removed channels' constants), ``plan`` and ``pass_plan``.

    Raises:
        ValueError: the model has no BatchNorm (nothing to slim), or the policy is invalid.
    """
    if thresh is not None and target_flops is not None:
        raise ValueError("prune: give thresh or target_flops, not both")
    if not any(isinstance(m, NORM_TYPES) for m in model.modules()):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise ValueError(
            f"nothing to slim: {type(model).__name__} has no BatchNorm layer, so there is no γ to rank "
            f"channels by{' (it normalises with ' + ', '.join(norms) + ')' if norms else ''}. Network slimming "
            "needs BatchNorm after the convs you want to prune. Hint: slimnet.prune_zeroed(model, x) turns "
            "filters you zeroed yourself (e.g. with torch.nn.utils.prune) into a smaller model.")

    if target_flops is not None:
        with torch.no_grad():
            found, _ = threshold_for_flops(model, example_inputs, target_flops, min_channels=min_channels,
                                           round_to=round_to, leaf_modules=leaf_modules, within=within)
        thresh, percent = (found, None) if found > -math.inf else (None, 0.0)

    def choose(graph: ChannelGraph, stats: InputStats) -> PlanDecision:
        return decide(restrict_to(graph, within), model, thresh=thresh, percent=percent, min_channels=min_channels,
                      round_to=round_to, tie_break=target_flops is not None)

    report = run_surgery(model, example_inputs, choose, fold_bias=fold_bias, measure_inputs=fold_bias,
                         leaf_modules=leaf_modules, caller="prune")
    asked = thresh is not None or (percent or 0) > 0
    if asked and not report.channels:
        message = "prune: " + nothing_cut_message(model, report.threshold)
        warnings.warn(message, stacklevel=2)
        report.warnings.append(message)
    return report


def nothing_cut_message(model: nn.Module, threshold: float | None) -> str:
    """Why a cut removed nothing, and which thresholds would remove something: silence is a bug."""
    gammas = [m.weight.detach().abs().float().flatten() for m in model.modules()
              if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None]
    if not gammas:
        return "the cut removed nothing: the model has no norm with a γ"
    flat = torch.cat(gammas)
    q = torch.quantile(flat, torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]))
    at = f"|γ| threshold {threshold:.4g}" if threshold is not None else "this policy"
    return (f"the cut removed nothing at {at}: the network's |γ| run min {q[0]:.3g}, 10% {q[1]:.3g}, "
            f"median {q[3]:.3g}, 90% {q[5]:.3g}; thresh={q[2]:.3g} / {q[3]:.3g} / {q[4]:.3g} would select 30 / 50 / "
            "70% of the channels (or use percent= / target_flops=; a longer or stronger sparse phase pushes "
            "more γ to zero)")


@torch.no_grad()
def _runs_after_rewriting(model: nn.Module, inputs, plan) -> None:
    """The plan rewrote size attributes (split sizes, slice bounds) on the evidence that each equals the
    size the forward uses; run the cut model once to be sure. If it fails, the cut is rolled back (the
    caller's transaction) and the error names the attributes, instead of a model that breaks later."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    try:
        with preserved_modes(model):
            model.eval()(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure means the rewrite was wrong
        names = ", ".join(f"{m}.{a}" for m, values in plan.attrs.items() for a in values)
        raise RuntimeError(f"prune: the cut model does not run after rewriting {names} ({first_line(err)}): the "
                           "forward does not use those attributes as its sizes; the model is left as it was. "
                           "Hint: register the op in slimnet.graph.OPS, or pass the module in leaf_modules") from None


@torch.no_grad()
def _record_inputs(model: nn.Module, inputs) -> InputStats:
    """Each layer's input statistics in eval mode over ``inputs``: the one real forward folding needs."""
    stats = InputStats(model)
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with stats.recording(), preserved_modes(model):
        model.eval()
        model(*inputs)
    return stats


def _flops(model: nn.Module, example_inputs, uses: dict[str, int] | None) -> int:
    """The report's FLOPs: on shapes (``measure.weight_uses``) when the forward allows, else counted."""
    return flops_from_uses(model, uses) if uses is not None else count_flops(model, example_inputs)[0]


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
    with preserved_modes(model):
        graph = trace_channel_groups(model, example_inputs, leaf_modules)
        for message in graph.warnings:
            warnings.warn(f"{caller}: {message}", stacklevel=3)
    clock.lap("trace")
    # Output positions per conv/linear give the FLOPs before and after the cut from weight shapes alone:
    # the traced (train-mode) graph's when no module reads `training`, else an eval-mode trace's.
    uses = graph.uses if not reads_training(model) else weight_uses(model, example_inputs)
    stats = InputStats(model)
    if uses is None:  # not countable on shapes: positions from one real forward, folding's if it needs one
        inputs = example_inputs if stats_inputs is None or not measure_inputs else stats_inputs
        uses = weight_uses_from_forward(model, inputs, stats.recording(enabled=measure_inputs))
    elif measure_inputs:
        stats = _record_inputs(model, example_inputs if stats_inputs is None else stats_inputs)
    flops_before, params_before = _flops(model, example_inputs, uses), count_params(model)
    widths_before = layer_widths(model)
    clock.lap("measure")
    with preserved_modes(model):
        decision = choose(graph, stats)
        plan = decision.plan
        clock.lap("plan")
        folded = []
        check_plan(model, plan)  # all or nothing: before folding changes a bias
        touched = [*plan.keep, *plan.attrs, *(graph.norm_after[n] for n in plan.keep if n in graph.norm_after)]
        with transaction(model, touched):
            if fold_bias and plan:
                result = fold_removed_inputs(model, graph, plan, stats)
                plan.add_bias, folded = result.new_bias, result.folded
            clock.lap("fold")
            apply_plan(model, plan, checked=True)
            if plan.attrs:
                _runs_after_rewriting(model, example_inputs, plan)
        clock.lap("cut")
    previous = current_plan(model)
    model.slimnet_plan = previous.then(plan) if previous is not None else plan
    flops_after, params_after = _flops(model, example_inputs, uses), count_params(model)
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
        # wall time per step; "surgery" is trace + plan + fold + cut (the measure steps count FLOPs on
        # shapes for this report, and the first also records the inputs folding needs: one real forward)
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
