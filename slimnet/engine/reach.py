"""What surgery can reach in a model, known before any training: call it before the sparse phase.

A channel group is *reachable* when it is prunable (not frozen, born in a layer we can slice, ranked by a
norm). The shares are:

- **BN channels**: norm entries (BatchNorm, SyncBatchNorm, FrozenBatchNorm2d) that sit in a reachable
  group, over all norm entries the forward uses. Sparsity on the others is wasted.
- **FLOPs**: FLOPs of the conv and linear layers with at least one channel axis (filters or inputs) in a
  reachable group, over the FLOPs of all conv and linear layers (per sample, from the traced shapes; the
  train-mode graph, so auxiliary heads count). An upper bound on what a cut can remove.

Every frozen group holding a norm is listed with its reason; ``trace_channel_groups`` warns about each.
A module whose forward reads a channel count the trace does not show (ultralytics' attention) is found
as ``prune`` finds it, by running a copy cut by one channel per group (only when the graph holds an op it
does not model), and its groups count as out of reach.
Groups whose norms have a frozen γ (``requires_grad=False``, FrozenBatchNorm2d) are out of reach too,
as ``prune`` keeps them whole unless ``cut_frozen=True`` (``plan.mark_frozen``): they were never
sparsity-trained.

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from slimnet.engine.cut import find_kept_whole
from slimnet.engine.plan import mark_frozen
from slimnet.graph import ChannelGraph, trace_channel_groups


@dataclass
class Reach:
    """The share of norm channels and of FLOPs surgery can cut, and what is left whole, and why."""

    bn_channels: float  # reachable norm entries / all norm entries
    flops: float  # FLOPs of layers with a cuttable channel axis / all conv+linear FLOPs
    bn_channels_total: int
    flops_total: int
    frozen: list[tuple[str, str]] = field(default_factory=list)  # (layers, reason) per frozen group with a norm

    def to_dict(self) -> dict:
        return {"bn_channels": self.bn_channels, "flops": self.flops, "bn_channels_total": self.bn_channels_total,
                "flops_total": self.flops_total, "frozen": [list(f) for f in self.frozen]}

    def __str__(self) -> str:
        lines = [f"surgery can reach {self.bn_channels:.0%} of {self.bn_channels_total} BN channels and "
                 f"{self.flops:.0%} of the FLOPs"]
        lines += [f"  kept whole: {layers}: {reason}" for layers, reason in self.frozen]
        return "\n".join(lines)


def reach_of(graph: ChannelGraph, model: nn.Module | None = None, *, cut_frozen: bool = False) -> Reach:
    """:class:`Reach` of an already traced graph. Give the ``model`` (or a graph ``plan.mark_frozen``
    already marked) for groups with a frozen γ to count as out of reach, as ``prune`` keeps them whole;
    the marking's warnings are added to ``graph.warnings``."""
    if model is not None:
        mark_frozen(graph, model, cut_frozen)
    bn_total = bn_reach = 0
    for group in graph.groups:
        entries = sum(group.size * ref.mult for ref in group.norms)
        bn_total += entries
        bn_reach += entries if group.prunable else 0
    flops_total = sum(graph.flops.values())
    flops_reach = 0
    for module, flops in graph.flops.items():
        parts = [gid for kind in ("out", "in", "dw") for gid, _, _ in graph.axes.get((module, kind), ())]
        if any(graph.groups[gid].prunable for gid in parts):
            flops_reach += flops
    frozen = [(g.describe(), g.frozen_by[0]) for g in graph.groups if g.norms and g.frozen_by]
    return Reach(bn_channels=bn_reach / bn_total if bn_total else 0.0,
                 flops=flops_reach / flops_total if flops_total else 0.0,
                 bn_channels_total=bn_total, flops_total=flops_total, frozen=frozen)


def reach(model: nn.Module, example_inputs, leaf_modules=(), *, cut_frozen: bool = False) -> Reach:
    """Trace ``model`` and say how much of it surgery can cut, before anything is trained.

    Example::

        r = slimnet.reach(model, torch.randn(1, 3, 224, 224))
        print(r)            # shares, then one line per group kept whole, with its reason
        r.to_dict()         # for results.json

    The trace warns once per frozen group that holds a norm (and per unknown op), and once per kind of
    frozen γ (``cut_frozen=True``: counted as ``prune(..., cut_frozen=True)`` would cut them); those
    warnings are the same facts as ``Reach.frozen``.
    """
    graph = trace_channel_groups(model, example_inputs, leaf_modules)
    if found := find_kept_whole(model, example_inputs, leaf_modules, graph):  # what only a cut model shows
        graph = trace_channel_groups(model, example_inputs, leaf_modules, found)
    graph = mark_frozen(graph, model, cut_frozen)
    for message in graph.warnings:
        warnings.warn(f"reach: {message}", stacklevel=2)
    return reach_of(graph)
