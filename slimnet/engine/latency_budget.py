"""Latency as a budget: ``prune(model, x, target_latency=0.5)`` keeps at most half of the predicted latency,
choosing channels by |γ| per unit of latency saved, at widths the hardware likes (HALP, Shen et al. 2022).

The prediction comes from the model's latency table (``latency_table.LatencyModel``): each conv / linear
layer's time at any pair of input and output widths is a bilinear interpolation in its measured grid
(made monotone: more channels never cost less), and the rest of the model's time is ``fixed = a + b · v``,
``v`` the share of the layers' output activations kept (``a``: the framework's overhead, ``b``:
activations, pooling and sums, both fitted on the full model and a half-width copy when the table is
built). So ``L(n) = fixed(n) + Σ_layers T_layer(n_in, n_out)``, where ``n`` are the kept widths of the
channel groups; ``L(full)`` is the model's measured latency and the budget is ``target_latency × L(full)``.

**Widths the hardware likes.** Each prunable group gets a rounding step: the rounding probes of every
layer that sees the group (producers along their outputs, readers along their inputs) are summed, so
each layer weighs by its time, and ``latency_table.detect_step`` picks the largest step the sum shows as a
staircase (8 / 16 / 32 with oneDNN; 1 when latency falls smoothly). Its least common multiple with
``round_to`` and a grouped conv's blocks is the group's step; the report says, per layer, the step and the
width it ended at (``report["latency"]["rounding"]``).

**The knapsack.** Each group (or each tie of groups that must keep equal counts) is one *unit* whose
options are its kept counts, multiples of its step from ``min_channels`` up, and the full width. The value
of an option is the sum of the |γ| it keeps (the strongest channels first; ties split by β as
``plan.tie_broken`` does); its cost the latency it leaves. Maximising the |γ| kept under the budget is a
multiple-choice knapsack, except that a layer's time depends on two groups (its input and its output), so
costs are not additive. The solver:

1. *linearise*: around the current widths (full, at first), each option's cost is the exact change of
   ``L`` when only that unit moves;
2. *solve exactly*: a dynamic programme over the units keeps the Pareto front of (latency, |γ| kept)
   pairs (``solve_choices``; at most ``MAX_OPTIONS`` options per unit, evenly spaced); it is exact while the
   front has at most ``MAX_POINTS`` points, and beyond that keeps the best point per latency bin of width
   budget / ``MAX_POINTS`` (never a point over budget: costs stay exact, only optimality is approximate);
3. *repair on the real model*: the coupled ``L`` of that choice is computed; while it is over budget the
   step with the least |γ| lost per millisecond saved is taken, then while a step back up fits it is
   taken, best |γ| per millisecond first (greedy by ratio with a fix-up);
4. repeat from 1 around the repaired widths (``ROUNDS`` times, or until the choice stops moving) and keep
   the best feasible choice;
5. *polish* it on the coupled model: pairs of units a layer couples, and chains of three through them,
   re-optimised jointly (every combination of their options within ``WINDOW`` steps, the others fixed),
   then one-step exchanges between any two units, until none keeps more |γ| within budget.

On a separable instance (no layer between two cut groups) step 2 alone is exact. On coupled instances the
whole is a heuristic; on a three-group chain with every width allowed it gave the exhaustive optimum in
all of 420 random instances tried (seeds × budgets × step 1 and 4), and the tests compare it with
exhaustive search. resnet50 at 224 (about 50 units) is solved in 2-5 s.

**Reported honestly.** With ``settings.check`` (and a table measured here) the uncut model is kept aside
and, after the cut, both are timed interleaved (``model_repeats`` rounds); the measured fraction is the
ratio of medians, with the spread of the per-round ratios. A measured latency off the prediction by more
than ``settings.tolerance`` is a warning giving both numbers.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from slimnet.engine.latency_table import (
    LatencyModel,
    LatencySettings,
    LatencyTable,
    LatencyTableError,
    LayerCall,
    detect_step,
    latency_table,
    model_layers,
    time_models,
)
from slimnet.engine.plan import (
    PlanDecision,
    group_scores,
    mark_frozen,
    plan_for,
    restrict_to,
    tie_broken,
    why_nothing_cut,
)
from slimnet.errors import NothingCutError
from slimnet.graph import ChannelGraph, trace_channel_groups

MAX_POINTS = 1024  # Pareto points kept per unit by the dynamic programme (beyond: one per latency bin)
MAX_OPTIONS = 64  # options per unit the programme weighs (evenly spaced over a wider unit's)
WINDOW = {2: 12, 3: 3}  # a joint move of 2 (3) units tries each one's options this many steps either side
WINDOW_LARGE = {2: 4, 3: 1}  # ... when there are more than NEIGHBOURS_ALL units (resnet50: ~50)
NEIGHBOURS_ALL = 6  # with at most this many units, every pair and triple moves jointly (else coupled ones)
ROUNDS = 4  # linearise-solve-repair rounds


def check_target_latency(target_latency) -> float:
    """``target_latency`` as a float in (0, 1), else a one-line ValueError (before anything is measured)."""
    if isinstance(target_latency, bool) or not isinstance(target_latency, (int, float)) \
            or not 0 < target_latency < 1:
        raise ValueError(f"target_latency={target_latency!r} must be a fraction in (0, 1): the share of the "
                         "measured latency to keep (0.5 halves it)")
    return float(target_latency)


def check_latency_options(target_latency, latency_table=None, latency_settings=None) -> LatencySettings:
    """Everything about a latency cut that can be wrong before training, as one-line errors: the target, the
    settings, and whether there is a way to measure (a backend that runs here, a device, or a table)."""
    check_target_latency(target_latency)
    settings = LatencySettings.of(latency_settings)
    settings.validate(have_table=latency_table is not None)
    return settings


# --------------------------------------------------------------------------------------------------
# Units, steps and values
# --------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """Groups cut together: each member ``(group id, k)`` keeps ``t * k`` channels for the unit's option ``t``."""

    members: list[tuple[int, int]]
    options: list[int]  # per-k counts, ascending; the last is the full width
    step: int  # the per-k step of the options (before the full width)
    values: list[float]  # |γ| kept at each option

    def widths(self, j: int) -> dict[int, int]:
        return {g: self.options[j] * k for g, k in self.members}


def group_steps(table: LatencyTable, graph: ChannelGraph, calls: list[LayerCall]) -> dict[int, int]:
    """Per group id, the step its layers' summed rounding probes show (``detect_step``); 1 without probes."""
    curves: dict[int, dict[int, float]] = {}
    for call in calls:
        entry = table.layers.get(call.signature)
        if entry is None:
            continue
        dw = entry["spec"].get("dw", False)
        for axis, kind in (("out", "dw" if dw else "out"), ("in", "in")):
            layout = graph.axes.get((call.module, kind))
            probes = entry.get("probes", {}).get(axis)
            if not probes or not layout or len(layout) != 1 or layout[0][2] != 1:
                continue  # a concatenation or a flatten: this axis says nothing about one group's step
            gid = layout[0][0]
            curve = curves.setdefault(gid, {})
            if curve and set(curve) != set(probes):
                continue
            for w, v in probes.items():
                curve[w] = curve.get(w, 0.0) + v
    steps = table.settings.get("steps") or []
    return {gid: detect_step(curve, graph.groups[gid].size, steps) for gid, curve in curves.items()}


def _value_table(score: torch.Tensor, blocks: int) -> torch.Tensor:
    """``v[n]``: the sum of the ``n`` strongest scores (``n / blocks`` per block), for n a multiple of blocks."""
    per_block = torch.sort(score.double().view(blocks, -1), dim=1, descending=True).values
    cums = torch.cat([torch.zeros(blocks, 1, dtype=torch.float64), per_block.cumsum(1)], 1)  # (blocks, size/b + 1)
    out = torch.zeros(len(score) + 1, dtype=torch.float64)
    per = per_block.shape[1]
    out[torch.arange(per + 1) * blocks] = cums.sum(0)
    return out


def _strongest(score: torch.Tensor, n: int, blocks: int) -> torch.Tensor:
    per_block = score.view(blocks, -1)
    local = torch.topk(per_block, n // blocks, dim=1, sorted=False).indices
    return torch.sort((local + torch.arange(blocks)[:, None] * per_block.shape[1]).flatten()).values


def build_units(graph: ChannelGraph, scores: dict[int, torch.Tensor], steps: dict[int, int], *, min_channels: int,
                round_to: int) -> list[Unit]:
    """The knapsack's units: each scored group alone, or each tie of groups (``graph.ties``) together; a tie
    with a member nothing ranks is left whole (no unit), as ``plan`` leaves it."""
    parent = {g: g for g in scores}

    def find(g):
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    ks: dict[int, int] = {}
    whole: set[int] = set()
    for tie in graph.ties:
        if any(g not in scores for g, _ in tie):
            whole |= {g for g, _ in tie}
            continue
        for g, k in tie:
            if ks.setdefault(g, k) != k:  # in two ties with different k: not one count per unit, left whole
                whole.add(g)
            parent[find(g)] = find(tie[0][0])
    ks = {g: ks.get(g, 1) for g in scores}
    members: dict[int, list[tuple[int, int]]] = {}
    for g in scores:
        members.setdefault(find(g), []).append((g, ks[g]))
    units = []
    values = {g: _value_table(s, graph.groups[g].blocks) for g, s in scores.items()}
    for group in members.values():
        if any(g in whole for g, _ in group):
            continue
        step = 1
        for g, k in group:
            need = math.lcm(graph.groups[g].blocks, round_to, steps.get(g, 1))
            step = math.lcm(step, need // math.gcd(need, k))
        top = min(graph.groups[g].size // k for g, k in group)  # per-k count of the full width
        low = max(math.ceil(max(min(min_channels, graph.groups[g].size), 1) / k) for g, k in group)
        options = [*range(math.ceil(low / step) * step, top, step), top]  # multiples of the step, and whole
        unit_values = [float(sum(values[g][t * k] for g, k in group)) for t in options]
        units.append(Unit(members=group, options=options, step=step, values=unit_values))
    return units


# --------------------------------------------------------------------------------------------------
# The knapsack
# --------------------------------------------------------------------------------------------------


def solve_choices(values: list[list[float]], costs: list[list[float]], capacity: float,
                  max_points: int = MAX_POINTS) -> list[int] | None:
    """The multiple-choice knapsack: one option per unit, the most total value with total cost <= capacity.

    A dynamic programme over the units keeping the Pareto front of (cost, value): exact while the front has
    at most ``max_points`` points, then the most valuable point per cost bin (width capacity / max_points).
    Returns the option index per unit, or None when even the cheapest options exceed ``capacity``.
    """
    lows = [min(c) for c in costs]
    room = capacity - sum(lows)
    if room < -1e-12 * max(1.0, abs(capacity)):
        return None
    room = max(room, 0.0)
    eps = 1e-12 * max(1.0, abs(capacity))
    front_cost = torch.zeros(1, dtype=torch.float64)
    front_value = torch.zeros(1, dtype=torch.float64)
    history = []
    for value, cost, low in zip(values, costs, lows):
        c = torch.tensor(cost, dtype=torch.float64) - low
        v = torch.tensor(value, dtype=torch.float64)
        n, m = len(front_cost), len(c)
        all_cost = (front_cost[:, None] + c[None, :]).flatten()
        all_value = (front_value[:, None] + v[None, :]).flatten()
        parent = torch.arange(n).repeat_interleave(m)
        option = torch.arange(m).repeat(n)
        fits = all_cost <= room + eps
        all_cost, all_value, parent, option = all_cost[fits], all_value[fits], parent[fits], option[fits]
        order = torch.argsort(-all_value, stable=True)  # by cost, then most valuable first
        order = order[torch.argsort(all_cost[order], stable=True)]
        all_cost, all_value, parent, option = all_cost[order], all_value[order], parent[order], option[order]
        best_before = torch.cummax(all_value, 0).values
        keep = torch.ones(len(all_value), dtype=torch.bool)
        keep[1:] = all_value[1:] > best_before[:-1]  # Pareto: each point worth more than every cheaper one
        all_cost, all_value, parent, option = all_cost[keep], all_value[keep], parent[keep], option[keep]
        if len(all_cost) > max_points:  # thin: the last (most valuable) point of each cost bin
            bins = torch.clamp((all_cost / (room + eps) * max_points).long(), max=max_points - 1)
            last = torch.ones(len(bins), dtype=torch.bool)
            last[:-1] = bins[1:] != bins[:-1]
            all_cost, all_value, parent, option = all_cost[last], all_value[last], parent[last], option[last]
        history.append((parent, option))
        front_cost, front_value = all_cost, all_value
    at = int(torch.argmax(front_value))  # the front is sorted by value too: the last point
    picks = []
    for parent, option in reversed(history):
        picks.append(int(option[at]))
        at = int(parent[at])
    return picks[::-1]


class _Search:
    """The linearise - solve - repair - exchange search of the module's docstring over ``units``."""

    def __init__(self, units: list[Unit], model: LatencyModel, budget: float):
        # within budget means within 1e-9 of it: the latency of a choice is summed from changes, in floats
        self.units, self.model, self.budget = units, model, budget * (1 + 1e-9)

    def widths(self, choice: list[int]) -> dict[int, int]:
        out = {}
        for unit, j in zip(self.units, choice):
            out.update(unit.widths(j))
        return out

    def value(self, choice: list[int]) -> float:
        return sum(unit.values[j] for unit, j in zip(self.units, choice))

    def move(self, widths: dict[int, int], u: int, j: int) -> float:
        return self.model.delta(widths, self.units[u].widths(j))

    def run(self, rounds: int = ROUNDS) -> tuple[list[int], bool]:
        choice = [len(u.options) - 1 for u in self.units]
        # the programme sees at most MAX_OPTIONS options per unit (evenly spaced, both ends kept); repair and
        # exchange then move one option at a time
        subsets = [sorted({round(i * (len(u.options) - 1) / (MAX_OPTIONS - 1)) for i in range(MAX_OPTIONS)})
                   if len(u.options) > MAX_OPTIONS else list(range(len(u.options))) for u in self.units]
        best: list[int] | None = None
        for _ in range(rounds):
            widths = self.widths(choice)
            base = self.model.total(widths)
            costs = [[self.move(widths, u, j) for j in subset] for u, subset in enumerate(subsets)]
            values = [[unit.values[j] for j in subset] for unit, subset in zip(self.units, subsets)]
            picked = solve_choices(values, costs, self.budget - base)
            picked = [subset[j] for subset, j in zip(subsets, picked)] if picked is not None else [0] * len(self.units)
            repaired, feasible = self.repair(picked)
            if feasible and (best is None or self.value(repaired) > self.value(best) + 1e-12):
                best = repaired
            if repaired == choice:
                break
            choice = repaired
        if best is None:  # even the deepest cut is over budget: take it
            return [0] * len(self.units), False
        return self.polish(best), True

    def neighbourhoods(self) -> list[tuple[int, ...]]:
        """Units to re-optimise together: pairs a layer couples (its input in one, its output in the other) and
        chains of three through them; every pair and triple when there are few units."""
        owner = {g: u for u, unit in enumerate(self.units) for g, _ in unit.members}
        near: dict[int, set[int]] = {u: set() for u in range(len(self.units))}
        for layer in self.model.layers:
            ins = {owner[g] for g, _, _ in layer.in_layout or () if g in owner}
            outs = {owner[g] for g, _, _ in layer.out_layout or () if g in owner}
            for a in ins:
                for b in outs - {a}:
                    near[a].add(b)
                    near[b].add(a)
        if len(self.units) <= NEIGHBOURS_ALL:
            return [*itertools.combinations(range(len(self.units)), 2),
                    *itertools.combinations(range(len(self.units)), 3)]
        pairs = {(a, b) for a in near for b in near[a] if a < b}
        triples = {tuple(sorted((a, b, c))) for b in near for a in near[b] for c in near[b] if a < c}
        return sorted(pairs) + sorted(triples)

    def polish(self, choice: list[int], passes: int = 20) -> list[int]:
        """Local search from a feasible choice: pairs and chains of three units re-optimised jointly (every
        combination of their options near where they are, the others fixed), then one-step exchanges between
        any two units, until none finds more |γ| within budget."""
        choice = list(choice)
        moves = self.neighbourhoods()
        for _ in range(passes):
            before = list(choice)
            for units in moves:
                choice = self.joint_move(choice, units)
            choice = self.exchange(choice)
            if choice == before:
                break
        return choice

    def joint_move(self, choice: list[int], units: tuple[int, ...]) -> list[int]:
        """The best combination of ``units``' options (within ``WINDOW[len(units)]`` steps of where they are)
        that fits with the other units fixed."""
        widths = self.widths(choice)
        room = self.budget - self.model.total(widths)
        now = sum(self.units[u].values[choice[u]] for u in units)
        reach = (WINDOW if len(self.units) <= NEIGHBOURS_ALL else WINDOW_LARGE)[len(units)]
        ranges = [range(max(0, choice[u] - reach), min(len(self.units[u].options), choice[u] + reach + 1))
                  for u in units]
        touched = self.model.layers_of([g for u in units for g, _ in self.units[u].members])
        layers = [self.model.layers[i] for i in touched]
        then = sum(layer.time(widths) for layer in layers)
        best = None
        for js in itertools.product(*ranges):
            gain = sum(self.units[u].values[j] for u, j in zip(units, js)) - now
            if gain <= 1e-12 or (best is not None and gain <= best[0]):
                continue
            new = dict(widths)
            for u, j in zip(units, js):
                new.update(self.units[u].widths(j))
            change = sum(layer.time(new) for layer in layers) - then + self.model.fixed_change(widths, new)
            if change <= room:
                best = (gain, js)
        if best is None:
            return choice
        choice = list(choice)
        for u, j in zip(units, best[1]):
            choice[u] = j
        return choice

    def repair(self, choice: list[int]) -> tuple[list[int], bool]:
        """Steps down (least |γ| per ms saved) until within budget, then up (most |γ| per ms) while they fit."""
        choice = list(choice)
        widths = self.widths(choice)
        total = self.model.total(widths)
        while total > self.budget:
            best = None
            for u, unit in enumerate(self.units):
                j = choice[u]
                if j == 0:
                    continue
                saved = -self.move(widths, u, j - 1)
                lost = unit.values[j] - unit.values[j - 1]
                if saved <= 0:
                    continue
                ratio = lost / saved
                if best is None or ratio < best[0]:
                    best = (ratio, u, -saved)
            if best is None:
                return choice, False
            _, u, change = best
            choice[u] -= 1
            widths.update(self.units[u].widths(choice[u]))
            total += change
        while True:
            best = None
            for u, unit in enumerate(self.units):
                j = choice[u]
                if j + 1 >= len(unit.options):
                    continue
                cost = self.move(widths, u, j + 1)
                if total + cost > self.budget:
                    continue
                gain = unit.values[j + 1] - unit.values[j]
                ratio = gain / cost if cost > 0 else math.inf
                if best is None or ratio > best[0]:
                    best = (ratio, u, cost)
            if best is None:
                return choice, True
            _, u, cost = best
            choice[u] += 1
            widths.update(self.units[u].widths(choice[u]))
            total += cost

    def exchange(self, choice: list[int], limit: int = 500) -> list[int]:
        """One unit a step down and another a step up, while that fits and keeps more |γ| (the largest gain
        first; pairs are screened with each move's own latency change, then checked on the coupled model)."""
        choice = list(choice)
        for _ in range(limit):
            widths = self.widths(choice)
            room = self.budget - self.model.total(widths)
            downs = {a: (unit.values[choice[a]] - unit.values[choice[a] - 1], self.move(widths, a, choice[a] - 1))
                     for a, unit in enumerate(self.units) if choice[a] > 0}
            ups = {b: (unit.values[choice[b] + 1] - unit.values[choice[b]], self.move(widths, b, choice[b] + 1))
                   for b, unit in enumerate(self.units) if choice[b] + 1 < len(unit.options)}
            pairs = sorted(((gain - lost, a, b) for a, (lost, _) in downs.items() for b, (gain, _) in ups.items()
                            if a != b and gain - lost > 1e-12), reverse=True)
            for _, a, b in pairs:
                margin = 0.1 * (abs(downs[a][1]) + abs(ups[b][1]))  # the coupling can only move it this much
                if downs[a][1] + ups[b][1] > room + margin:
                    continue
                change = {**self.units[a].widths(choice[a] - 1), **self.units[b].widths(choice[b] + 1)}
                if self.model.delta(widths, change) <= room:
                    choice[a] -= 1
                    choice[b] += 1
                    break
            else:
                break
        return choice


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------


def prediction_gap(predicted: dict, measured: dict, tolerance: float) -> str | None:
    """A one-line warning when the measured latency of the cut model is off the prediction by more than
    ``tolerance`` (relative, on the fraction of the uncut model kept), else None. ``predicted``:
    ``{"before_ms", "after_ms"}``; ``measured``: ``{"before_ms", "after_ms", "fraction", "fraction_p25",
    "fraction_p75"}``."""
    want = predicted["after_ms"] / predicted["before_ms"]
    got = measured["fraction"]
    if abs(got / want - 1) <= tolerance:
        return None
    return (f"measured latency {measured['after_ms']:.4g} ms ({got:.2f} of {measured['before_ms']:.4g} ms uncut, "
            f"per-round p25-p75 {measured['fraction_p25']:.2f}-{measured['fraction_p75']:.2f}) is far from the "
            f"predicted {predicted['after_ms']:.4g} ms ({want:.2f} of {predicted['before_ms']:.4g} ms; tolerance "
            f"{tolerance:.0%}): the latency table may be stale or the machine busy; re-measure it "
            "(delete the cached table or pass a fresh one) or time with more repeats")


class LatencyBudget:
    """The ``target_latency`` policy for ``cut.run_surgery``: the table is obtained when built (measured,
    cached or given, before anything is cut), ``choose`` decides the plan, ``finish`` measures the cut model
    and completes the report."""

    def __init__(self, model: nn.Module, example_inputs, target_latency: float, *, table=None, settings=None,
                 min_channels: int = 1, round_to: int = 1, leaf_modules=(), within=None, cut_frozen: bool = False):
        self.target = check_target_latency(target_latency)
        self.settings = check_latency_options(self.target, table, settings)
        self.model, self.example_inputs = model, example_inputs
        self.min_channels, self.round_to = min_channels, round_to
        self.within, self.cut_frozen = within, cut_frozen
        with torch.no_grad():
            graph = trace_channel_groups(model, example_inputs, leaf_modules)
            self.calls = model_layers(model, example_inputs, graph)
            self.table = latency_table(model, example_inputs, self.settings, table, graph=graph)
        self.reference = None
        if self.settings.check and self.settings.here:
            self.reference = copy.deepcopy(model)  # the uncut model, timed beside the cut one afterwards
        self.details: dict = {}

    def choose(self, graph: ChannelGraph, stats=None) -> PlanDecision:
        start = time.perf_counter()
        known = len(graph.warnings)
        graph = mark_frozen(restrict_to(graph, self.within), self.model, self.cut_frozen)
        for message in graph.warnings[known:]:
            warnings.warn(f"prune: {message}", stacklevel=4)
        scores = tie_broken(group_scores(graph, self.model), graph, self.model)
        steps = group_steps(self.table, graph, self.calls)
        units = build_units(graph, scores, steps, min_channels=self.min_channels, round_to=self.round_to)
        units = [u for u in units if len(u.options) > 1]
        if not units:
            raise NothingCutError(f"prune: target_latency={self.target} removes nothing, the model is unchanged: "
                                  + why_nothing_cut(graph, self.model, self.min_channels))
        model = LatencyModel(self.table.layers, self.table.model, graph, self.calls)
        before = model.total({})
        budget = self.target * before
        search = _Search(units, model, budget)
        choice, feasible = search.run()
        widths = search.widths(choice)
        after = model.total(widths)
        if not feasible:
            warnings.warn(f"prune: target_latency={self.target}: the deepest cut min_channels={self.min_channels} "
                          f"and the rounding steps allow keeps {after / before:.3f} of the predicted latency; "
                          "using it", stacklevel=4)
        kept, floored, rounding, largest = {}, [], {}, -math.inf
        plain = group_scores(graph, self.model)
        for unit, j in zip(units, choice):
            for g, k in unit.members:
                group = graph.groups[g]
                n = unit.options[j] * k
                step = unit.step * k
                for layer in group.producers:
                    rounding[layer] = {"step": step, "channels": [group.size, n]}
                if n < group.size:
                    kept[g] = _strongest(scores[g], n, group.blocks)
                    gone = torch.ones(group.size, dtype=torch.bool)
                    gone[kept[g]] = False
                    largest = max(largest, float(plain[g][gone].max()))
                    if j == 0 and self.min_channels > step:
                        floored.append(group.describe())
        policy = {"target_latency": self.target, "min_channels": self.min_channels, "round_to": self.round_to,
                  "latency": {k: self.settings.key()[k] for k in ("backend", "batch", "threads", "dtype")}}
        plan = plan_for(graph, kept, threshold=None, policy=policy)
        self.details = {
            "target": self.target,
            "predicted": {"before_ms": before, "after_ms": after, "fraction": after / before,
                          "fixed_ms": [model.fixed({}), model.fixed(widths)]},  # outside the layers: before, after
            "feasible": feasible,
            "rounding": rounding,
            "largest_gamma_cut": largest if largest > -math.inf else None,
            "table": {"path": self.table.path, "source": self.table.source, "seconds": self.table.seconds,
                      "key": self.table.key, "created": self.table.created},
            "solve_seconds": time.perf_counter() - start,
        }
        return PlanDecision(plan=plan, threshold=None, kept=kept, floored=floored)

    def finish(self, report):
        """Measure the cut model against the uncut one (``settings.check``), warn when far from the
        prediction, and put it all in ``report["latency"]``."""
        details = dict(self.details)
        details["measured"] = None
        if self.reference is None:
            details["measured_skipped"] = ("the table was measured on another device" if not self.settings.here
                                           else "settings.check is off")
        else:
            try:
                before, after = time_models([self.reference, self.model], self.example_inputs, self.settings)
            finally:
                self.reference = None
            ratios = sorted(a / b for a, b in zip(after, before))
            q = statistics.quantiles(ratios, n=4, method="inclusive")
            measured = {"before_ms": statistics.median(before) * 1e3, "after_ms": statistics.median(after) * 1e3,
                        "fraction_p25": q[0], "fraction_p75": q[2], "repeats": len(after)}
            measured["fraction"] = measured["after_ms"] / measured["before_ms"]
            details["measured"] = measured
            message = prediction_gap(details["predicted"], measured, self.settings.tolerance)
            if message:
                warnings.warn(f"prune: {message}", stacklevel=3)
                report.warnings.append(f"prune: {message}")
        report["latency"] = details
        return report


__all__ = ["LatencyBudget", "LatencyModel", "LatencySettings", "LatencyTableError", "Unit", "build_units",
           "check_latency_options", "check_target_latency", "group_steps", "prediction_gap", "solve_choices"]
