"""Budget mode: the |γ| threshold that keeps at most a given fraction of the model's FLOPs.

Raising the threshold never adds FLOPs, so a binary search over the distinct channel scores finds the
*lowest* threshold within budget — the one that keeps the most channels. Each probe cuts a copy of the
model and counts its FLOPs; nothing is trained. Channels tied at one |γ| (often exactly zero) are put in
order by β (``plan.tie_broken``), so the search can stop inside a tie instead of cutting all of it.
"""

from __future__ import annotations

import copy
import math
import warnings

from torch import nn

from slimnet.engine.measure import count_flops
from slimnet.engine.plan import decide, group_scores, mark_frozen, restrict_to, tie_broken, why_nothing_cut
from slimnet.engine.surgery import apply_plan
from slimnet.errors import NothingCutError
from slimnet.graph import trace_channel_groups


def threshold_for_flops(model: nn.Module, example_inputs, target: float, *, min_channels: int = 1, round_to: int = 1,
                        leaf_modules=(), within=None, cut_frozen: bool = False) -> tuple[float, int]:
    """Return ``(threshold, flops)``: the lowest threshold whose cut model has ≤ ``target`` × FLOPs.

    The threshold is on the tie-broken scores: cut with ``decide(..., tie_break=True)``.

    ``-inf`` means no cut is needed (keep every channel).
    The threshold is one of the channel scores, so the next lower candidate exceeds the budget: the
    result is within one channel step of the target. If even the deepest cut the floors allow is over
    budget, that deepest cut is returned with a warning; if it removes nothing at all (every group
    frozen, outside ``within`` or at ``min_channels``), ``NothingCutError`` says why.
    Groups whose norms have a frozen γ are left whole unless ``cut_frozen`` (``plan.mark_frozen``).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target_flops must be in (0, 1], got {target}")
    flops0, _ = count_flops(model, example_inputs)
    budget = target * flops0
    graph = trace_channel_groups(model, example_inputs, leaf_modules)
    graph = mark_frozen(restrict_to(graph, within), model, cut_frozen)  # the groups the cut itself will see
    scores = tie_broken(group_scores(graph, model), graph, model)
    candidates = [-math.inf] + sorted({float(v) for s in scores.values() for v in s})

    cache: dict[int, int] = {}

    def flops_at(i: int) -> int:
        if i not in cache:
            probe = copy.deepcopy(model)
            policy = {"percent": 0.0} if i == 0 else {"thresh": candidates[i]}  # candidate 0: no cut
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # floors are expected while probing
                plan = decide(graph, probe, min_channels=min_channels, round_to=round_to, tie_break=True,
                              **policy).plan
            apply_plan(probe, plan)
            cache[i] = count_flops(probe, example_inputs)[0]
        return cache[i]

    lo, hi = 0, len(candidates) - 1
    if flops_at(hi) >= flops0 > budget:  # the deepest cut removes nothing
        raise NothingCutError(f"target_flops={target} removes nothing, the model is unchanged: "
                              + why_nothing_cut(graph, model, min_channels))
    if flops_at(hi) > budget:
        warnings.warn(f"target_flops={target}: the deepest cut min_channels={min_channels} allows keeps "
                      f"{flops_at(hi) / flops0:.3f} of the FLOPs; using it", stacklevel=2)
        return candidates[hi], flops_at(hi)
    while lo < hi:  # invariant: flops_at(hi) <= budget
        mid = (lo + hi) // 2
        if flops_at(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return candidates[hi], flops_at(hi)


