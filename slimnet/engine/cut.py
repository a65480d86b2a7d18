"""The plain-PyTorch entry points: ``prune`` a model in place and get a report back.

No Lightning, no Hydra: ``graph`` finds the channel groups, ``plan`` decides from |γ|, ``fold`` moves
what the removed channels still emit into the remaining biases, ``surgery`` cuts.
``zeroed.prune_zeroed`` runs the same steps with a plan read from zeroed filters instead of |γ|.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from slimnet.engine.budget import threshold_for_flops
from slimnet.engine.fold import InputStats, fold_removed_inputs
from slimnet.engine.latency_budget import LatencyBudget, check_target_latency
from slimnet.engine.measure import (
    count_flops,
    count_params,
    flops_from_uses,
    reads_training,
    weight_uses,
    weight_uses_from_forward,
)
from slimnet.engine.optim_state import ParamSnapshot
from slimnet.engine.plan import (
    PlanDecision,
    PrunePlan,
    _strongest,
    _tied_counts,
    decide,
    group_scores,
    groups_summary,
    mark_frozen,
    plan_for,
    restrict_to,
    why_nothing_cut,
)
from slimnet.engine.report import PruneReport
from slimnet.engine.surgery import apply_plan, check_plan, transaction
from slimnet.engine.valley import Valley, valley_note, valley_scores
from slimnet.errors import NothingCutError, first_line
from slimnet.graph import NORM_TYPES, OPS, ChannelGraph, trace_channel_groups
from slimnet.modes import preserved_modes


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
    input_stats: InputStats | None = None,
    cut_frozen: bool = False,
    target_latency: float | None = None,
    latency_table=None,
    latency_settings=None,
) -> dict:
    """Remove the channels whose BatchNorm |γ| is small, for real, in place.

    Args:
        model: any traceable ``nn.Module`` with BatchNorm layers.
        example_inputs: a tensor (or tuple) of the shape the model takes. With ``fold_bias`` its values
            matter a little: the removed channels' outputs are averaged over it (a batch of real data
            is best when γ is small but not zero; for γ = 0 any input gives the exact constant).
        thresh: keep channels with |γ| > thresh (absolute; wins over ``percent``). One that removes
            nothing is a warning saying which thresholds would (or that the |γ| are tied).
        percent: prune this fraction of all BatchNorm channels, ranked globally by |γ| (Liu et al.);
            channels kept whole anyway (frozen γ, outside ``within``, ops not understood) do not count.
            A tie of equal |γ| across the cut (all 0 after a sparse phase, all 1 in a fresh model) is
            split as ``target_flops`` splits it: lowest β first, evenly over the layers.
        target_flops: keep at most this fraction of the FLOPs: the lowest |γ| threshold that fits the
            budget is searched on the model as it is (no training per probe); wins over ``percent``.
            Channels tied at one |γ| (e.g. many at exactly 0) are cut lowest β first, so the budget
            is met inside the tie rather than overshot.
        min_channels: no layer keeps fewer channels than this (the paper's code could empty a layer).
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the (near-)constant output of removed channels, ``act(β)`` when γ → 0, into the
            bias of the layers that read them (see ``slimnet.engine.fold``), so accuracy right after the cut
            is close to the sparse model's.
        leaf_modules: module classes kept as black boxes when tracing.
        within: cut only channel groups whose norms all lie in these sub-modules (a dotted name or a
            list; e.g. ``"backbone.body"`` of a traced detector trunk). Layers outside that read those
            channels lose them too; the rest of the model is left whole. None: everywhere.
        input_stats: each layer's input statistics recorded beforehand over real data in eval mode
            (``slimnet.engine.fold.InputStats``): folding uses them instead of a forward over
            ``example_inputs`` (``SlimmingCallback`` records them, so it never keeps raw samples).
        cut_frozen: rank and cut norms whose γ does not require grad (``requires_grad=False``, e.g. a
            detector's frozen stages, or FrozenBatchNorm2d, whose γ is a buffer) as if they had been
            sparsity-trained. By default their channel groups are kept whole and named in the warnings.
        target_latency: keep at most this fraction (in (0, 1)) of the latency predicted by the model's latency
            table, choosing channels by |γ| per unit of latency saved (a knapsack over the table) at widths
            the hardware likes (a rounding step per layer, from the table); wins over ``percent``. The table
            is measured here once and cached, or given; the cut model is then timed against the uncut one and
            a latency far from the prediction is a warning (``slimnet.engine.latency_budget``).
        latency_table: a ``LatencyTable`` or the path of one (JSON), e.g. measured on the deployment device;
            None: the cached table, else measured now. A table measured elsewhere is refused.
        latency_settings: ``LatencySettings`` or a mapping of its fields (batch, threads, dtype, backend,
            device, device_name, grid, steps, repeats, tolerance, check, cache_dir); None: the defaults.

    Returns:
        a ``PruneReport``: ``flops_before/after``, ``params_before/after``, ``threshold``, ``channels``
        (module -> [before, after] for every layer that changed), ``groups``, ``warnings``, ``folded``
        (layers that absorbed removed channels' constants), ``plan`` and ``pass_plan``; with
        ``target_latency``, ``report["latency"]``: predicted and measured latency, each layer's rounding, the
        table (where it came from, what building it cost).
        ``threshold`` is the largest |γ| cut; ``threshold_reproduces`` says whether ``thresh=threshold``
        on the same model gives the same plan (not when the cut split a tie: the warnings say which).

    Raises:
        ValueError: the model has no BatchNorm (nothing to slim), or the policy is invalid.
        slimnet.errors.NothingCutError: ``percent`` > 0 or ``target_flops`` < 1 would remove nothing
            (every group frozen, outside ``within`` or at ``min_channels``); the model is unchanged.
    """
    if thresh is not None and target_flops is not None:
        raise ValueError("prune: give thresh or target_flops, not both")
    if target_latency is not None:
        check_target_latency(target_latency)
        if thresh is not None or target_flops is not None:
            raise ValueError("prune: give target_latency or thresh / target_flops, not two policies")
    valley = isinstance(thresh, str)
    if valley and thresh != "auto":
        raise ValueError(f"prune: thresh={thresh!r}: give a number (an absolute |γ|) or 'auto' (each layer at "
                         "the valley of its own |γ| histogram)")
    if not any(isinstance(m, NORM_TYPES) for m in model.modules()):
        norms = sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
        raise ValueError(
            f"nothing to slim: {type(model).__name__} has no BatchNorm layer, so there is no γ to rank "
            f"channels by{' (it normalises with ' + ', '.join(norms) + ')' if norms else ''}. Network slimming "
            "needs BatchNorm after the convs you want to prune. Hint: slimnet.prune_zeroed(model, x) turns "
            "filters you zeroed yourself (e.g. with torch.nn.utils.prune) into a smaller model.")

    if target_latency is not None:  # slimnet.engine.latency_budget: the table first, then the same surgery
        policy = LatencyBudget(model, example_inputs, target_latency, table=latency_table, settings=latency_settings,
                               min_channels=min_channels, round_to=round_to, leaf_modules=leaf_modules,
                               within=within, cut_frozen=cut_frozen)
        report = run_surgery(model, example_inputs, policy.choose, fold_bias=fold_bias, measure_inputs=fold_bias,
                             leaf_modules=leaf_modules, caller="prune", input_stats=input_stats)
        return policy.finish(report)
    asked = _asked(thresh, percent, target_flops)
    if target_flops is not None:
        with torch.no_grad():
            found, _ = threshold_for_flops(model, example_inputs, target_flops, min_channels=min_channels,
                                           round_to=round_to, leaf_modules=leaf_modules, within=within,
                                           cut_frozen=cut_frozen)
        thresh, percent = (found, None) if found > -math.inf else (None, 0.0)
    seen: list[tuple[ChannelGraph, PlanDecision]] = []
    valleys: dict[str, Valley] = {}

    def choose(graph: ChannelGraph, stats: InputStats) -> PlanDecision:
        known = len(graph.warnings)
        graph = mark_frozen(restrict_to(graph, within), model, cut_frozen)
        for message in graph.warnings[known:]:  # frozen γ: named, once, as the trace's own warnings are
            warnings.warn(f"prune: {message}", stacklevel=4)
        if valley:  # each layer's |γ| over its own valley: a channel stays above 1
            ratios, found = valley_scores(graph, model, group_scores(graph, model))
            valleys.update(found)
            decision = decide(graph, model, thresh=1.0, min_channels=min_channels, round_to=round_to, scores=ratios)
            decision.plan.policy = {**asked, "min_channels": min_channels, "round_to": round_to}
        else:
            decision = decide(graph, model, thresh=thresh, percent=percent, min_channels=min_channels,
                              round_to=round_to, tie_break=target_flops is not None)
        seen.append((graph, decision))
        if not decision.plan and _wants_a_cut(asked):  # refused before any tensor changes: all or nothing
            raise NothingCutError(f"prune: {_policy_text(asked)} removes nothing, the model is unchanged: "
                                  + _why(graph, model, decision, min_channels))
        if target_flops is not None:  # the policy asked for, not the threshold the search found
            decision.plan.policy = {**asked, "min_channels": min_channels, "round_to": round_to}
        return decision

    report = run_surgery(model, example_inputs, choose, fold_bias=fold_bias, measure_inputs=fold_bias,
                         leaf_modules=leaf_modules, caller="prune", input_stats=input_stats)
    (graph, decision), notes = seen[0], []
    if valley:
        notes.append(valley_note(valleys) or "thresh='auto': no BatchNorm layer to look for a valley in")
        report.details["valleys"] = {name: v.threshold for name, v in valleys.items()}  # None: no valley
    elif "thresh" in asked and not report.channels:
        notes.append(nothing_cut_message(graph, model, report.threshold, min_channels))
    if decision.split_tie is not None:
        notes.append(_split_tie_message(decision, asked))
    for message in notes:
        warnings.warn(f"prune: {message}", stacklevel=2)
        report.warnings.append(f"prune: {message}")
    return report


def _asked(thresh, percent, target_flops) -> dict:
    """The one policy the user asked for, as they wrote it (``thresh`` wins over ``percent``)."""
    if target_flops is not None:
        return {"target_flops": target_flops}
    return {"thresh": thresh} if thresh is not None else {"percent": percent}


def _why(graph: ChannelGraph, model: nn.Module, decision: PlanDecision, min_channels: int) -> str:
    """Why a cut removes nothing: a ``percent`` under one channel, or what ``why_nothing_cut`` finds."""
    if decision.threshold == -math.inf and group_scores(graph, model):  # ranked, but nothing under the cut-off
        return "that is less than one channel of those it can rank (raise it)"
    return why_nothing_cut(graph, model, min_channels)


def _wants_a_cut(asked: dict) -> bool:
    """``percent`` > 0 or ``target_flops`` < 1 ask for channels to go; a ``thresh`` only bounds |γ|."""
    return (asked.get("percent") or 0) > 0 or asked.get("target_flops", 1) < 1


def _policy_text(asked: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in asked.items())


def _split_tie_message(decision: PlanDecision, asked: dict) -> str:
    """Why ``thresh=report.threshold`` would not give this cut back, and what would."""
    n, value = decision.split_tie
    return (f"thresh={decision.threshold:.4g} would not reproduce this cut: it splits a tie of {n} channels at "
            f"|γ| = {value:.4g} (lowest β first), which a threshold cuts whole or not at all; pass "
            f"{_policy_text(asked)} to reproduce it")


def nothing_cut_message(graph: ChannelGraph, model: nn.Module, threshold: float | None, min_channels: int) -> str:
    """Why a ``thresh`` cut removed nothing, and which thresholds would remove something: silence is a bug.

    Suggestions come with the share they really select (a threshold selects every |γ| at or below it,
    so inside a tie it selects the whole tie); when the |γ| a threshold could split are all one value,
    it says so instead of suggesting one threshold for three shares."""
    at = f"|γ| threshold {threshold:.4g}" if threshold is not None else "this policy"
    scores = group_scores(graph, model)
    if not scores:
        return f"the cut removed nothing at {at}: " + why_nothing_cut(graph, model, min_channels)
    flat = torch.cat(list(scores.values()))
    q = torch.quantile(flat, torch.tensor([0.3, 0.5, 0.7]), interpolation="lower")  # real |γ| values
    if q[0] == q[-1]:  # at least 40% of the channels share one |γ|
        tied = int((flat == q[0]).sum())
        who = f"all {tied}" if tied == len(flat) else f"{tied} of the {len(flat)}"
        return (f"the cut removed nothing at {at}: {who} rankable channels have |γ| = {float(q[0]):.4g}: a threshold "
                "cannot split them; use percent= or target_flops=, which break ties by β, or sparsity-train first")
    picks = torch.unique(q)
    shares = [f"{float((flat <= t).double().mean()):.0%}".rstrip("%") for t in picks]
    return (f"the cut removed nothing at {at}: the rankable channels' |γ| run min {float(flat.min()):.3g}, median "
            f"{float(flat.median()):.3g}, max {float(flat.max()):.3g}; thresh={' / '.join(f'{float(t):.3g}' for t in picks)} "
            f"would select {' / '.join(shares)}% of them (or use percent= / target_flops=; a longer or stronger "
            "sparse phase pushes more γ to zero)")


def find_kept_whole(model: nn.Module, example_inputs, leaf_modules=(), graph: ChannelGraph | None = None
                    ) -> dict[str, str]:
    """The modules a cut must keep whole because their forward reads a channel count the trace does not
    show, with why, found as ``prune`` finds them: on a copy, take one channel out of every group a cut
    could touch and run it. Only a graph with ops it does not model can hide such a read (else ``{}``,
    at no cost); ``graph``: the model's graph if already traced. ``reach`` and the preflight use it."""
    if graph is None:
        graph = trace_channel_groups(model, example_inputs, leaf_modules)
    found: dict[str, str] = {}
    if not graph.unknown_ops:
        return found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_surgery(copy.deepcopy(model), example_inputs, _one_channel_from_each, fold_bias=False,
                        measure_inputs=False, leaf_modules=leaf_modules, caller="probe", kept_whole=found,
                        graph=graph)
        except (RuntimeError, ValueError):  # a failure no module explains: the cut itself will say so
            pass
    return found


def _one_channel_from_each(graph: ChannelGraph, _stats) -> PlanDecision:
    """The probe's plan: one channel (one per block) out of every group that can lose channels."""
    counts = _tied_counts(graph, {g.id: g.size - g.blocks for g in graph.groups if g.sliceable and g.size > g.blocks}, 1)
    first = {gid: _strongest(-torch.arange(graph.groups[gid].size, dtype=torch.float), n, graph.groups[gid].blocks)
             for gid, n in counts.items()}  # the first channels of each block: which ones does not matter
    return PlanDecision(plan=plan_for(graph, first), threshold=None, kept=first)


class _CutModelFails(Exception):
    """The cut model's forward raised: ``module`` is the innermost of the model's modules whose forward
    was running ("" for the model's own forward)."""

    def __init__(self, module: str, err: BaseException):
        super().__init__(first_line(err))
        self.module = module


@torch.no_grad()
def _runs_after_cut(model: nn.Module, inputs) -> None:
    """Run the cut model once, when the graph cannot vouch for it alone: around an op it does not model,
    a forward may read a channel count from a tensor's shape at run time (ultralytics' attention:
    ``.view(B, C, H, W)`` with ``C`` from ``x.shape``, which ``torch.export`` writes into the graph as a
    number), and a size attribute the plan rewrote is only known to equal a split size. If the forward fails, the caller's
    transaction puts the model back and the failing module is named."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    try:
        with preserved_modes(model):
            model.eval()(*inputs)
    except Exception as err:  # any failure means the cut broke the forward
        raise _CutModelFails(_innermost_module(model, err), err) from err


def _innermost_module(model: nn.Module, err: BaseException) -> str:
    """The qualified name of the innermost of ``model``'s modules whose ``forward`` is on the traceback."""
    names = {id(m): name for name, m in model.named_modules()}
    found, tb = "", err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "forward" else None
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _cut_failed_message(err: _CutModelFails, plan, kept_whole: dict[str, str]) -> str:
    where = f" in '{err.module}'" if err.module else ""
    attrs = ", ".join(f"{m}.{a}" for m, values in plan.attrs.items() for a in values)
    rewritten = f"; it rewrote {attrs}" if attrs else ""
    tried = f" (after keeping {', '.join(kept_whole)} whole)" if kept_whole else ""
    return (f"prune: the cut model does not run{where} ({err}){rewritten}{tried}: the forward uses a channel count "
            "the trace does not show; the model is left as it was. Hint: pass that module's class in "
            "leaf_modules, or register its op in slimnet.graph.OPS")


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
    input_stats: InputStats | None = None,
    kept_whole: dict[str, str] | None = None,
    graph: ChannelGraph | None = None,
) -> PruneReport:
    """Measure, trace, let ``choose`` decide a plan, fold, cut, and report: the steps every entry shares.

    ``measure_inputs``: record each layer's input statistics (needed by ``fold_bias`` and by choosers
    that look at activations), over ``stats_inputs`` if given, else over ``example_inputs``;
    ``input_stats``: statistics already recorded, used instead (nothing is recorded here);
    ``kept_whole``: filled with the modules found to read a channel count the trace does not show;
    ``graph``: the model's graph if already traced (its warnings are then not repeated).
    """
    clock = _Clock()
    before = ParamSnapshot(model)  # lets carry_optimizer_state slice an optimizer's state afterwards
    said: set[str] = set()
    kept_whole = {} if kept_whole is None else kept_whole  # modules found to read counts the trace cannot see

    def trace() -> ChannelGraph:
        with preserved_modes(model):
            graph = trace_channel_groups(model, example_inputs, leaf_modules, kept_whole)
        for message in graph.warnings:
            key = message.split(" (+")[0]  # a retry traces again: say each thing once, more reasons or not
            if key not in said:
                said.add(key)
                warnings.warn(f"{caller}: {message}", stacklevel=4)
        return graph

    graph = trace() if graph is None else graph
    clock.lap("trace")
    # Output positions per conv/linear give the FLOPs before and after the cut from weight shapes alone:
    # the traced (train-mode) graph's when no module reads `training`, else an eval-mode trace's.
    uses = graph.uses if not reads_training(model) else weight_uses(model, example_inputs)
    stats = InputStats(model)
    if input_stats is not None:
        stats, measure_inputs = input_stats, False
    if uses is None:  # not countable on shapes: positions from one real forward, folding's if it needs one
        inputs = example_inputs if stats_inputs is None or not measure_inputs else stats_inputs
        uses = weight_uses_from_forward(model, inputs, stats.recording(enabled=measure_inputs))
    elif measure_inputs:
        stats = _record_inputs(model, example_inputs if stats_inputs is None else stats_inputs)
    flops_before, params_before = _flops(model, example_inputs, uses), count_params(model)
    widths_before = layer_widths(model)
    clock.lap("measure")
    while True:
        try:
            decision, folded = _cut(model, graph, stats, choose, fold_bias, example_inputs, clock)
            break
        except _CutModelFails as err:
            # Keeping a module whole helps when its own forward reads the count; a layer the graph models
            # (a conv given the wrong width) only shows that the fault lies before it, and the model's own
            # forward leaves nothing narrower to keep whole.
            if (not err.module or err.module in kept_whole
                    or OPS.module(model.get_submodule(err.module)) is not None):
                raise RuntimeError(_cut_failed_message(err, err.plan, kept_whole)) from None
            kept_whole[err.module] = (f"'{err.module}' ({type(model.get_submodule(err.module)).__name__}) reads a "
                                      f"channel count the trace does not show: its forward failed after a cut ({err})")
            graph = trace()  # the same policy on a graph that leaves that module's channels whole
    plan = decision.plan
    previous = current_plan(model)
    model.slimnet_plan = previous.then(plan) if previous is not None else plan
    flops_after, params_after = _flops(model, example_inputs, uses), count_params(model)
    widths_after = layer_widths(model)
    clock.lap("measure_after")
    return PruneReport(
        threshold=decision.threshold,
        threshold_reproduces=decision.reproduces,
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


def _cut(model, graph: ChannelGraph, stats: InputStats, choose, fold_bias: bool, example_inputs, clock):
    """Plan on ``graph``, fold, cut, and run the cut model once, all or nothing: on any failure the model
    is put back as it was (the transaction) and the error goes on (:class:`_CutModelFails` if the cut model
    did not run). Returns the decision and the folded layers."""
    with preserved_modes(model):
        decision = choose(graph, stats)
        plan = decision.plan
        clock.lap("plan")
        folded = []
        check_plan(model, plan)  # all or nothing: before folding changes a bias
        touched = [*plan.keep, *plan.attrs, *(graph.norm_after[n] for n in plan.keep if n in graph.norm_after)]
        try:
            with transaction(model, touched):
                if fold_bias and plan:
                    result = fold_removed_inputs(model, graph, plan, stats)
                    plan.add_bias, folded = result.new_bias, result.folded
                clock.lap("fold")
                apply_plan(model, plan, checked=True)
                if plan and (plan.attrs or graph.unknown_ops):  # a graph of known ops only vouches for itself
                    _runs_after_cut(model, example_inputs)
        except _CutModelFails as err:
            err.plan = plan
            raise
        clock.lap("cut")
    return decision, folded


class _Clock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._last = now - self._last, now
