"""``PrunePlan``: which channels each layer keeps, decided from BatchNorm |γ| and a policy.

Ranking follows Liu et al. 2017: one *global* threshold over the raw |γ| of every BatchNorm, with no
per-layer normalisation (normalising by a layer's mean, as Torch-Pruning's default does, makes global
slimming prune almost uniformly). A group whose channels are seen by several norms (a residual sum)
keeps a channel when *any* of those norms gives it a large |γ|: removing it must be harmless on every
path.

The plan itself is plain data: for each module, for each sliced axis, the indices kept, counted in the
*original* model's channels. That makes it JSON, lets it replay on a freshly built model before a
state_dict is loaded, and lets a second pruning pass compose onto the first.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from slimnet.graph import ChannelGraph, ChannelGroup

PLAN_FORMAT = "slimnet-plan/1"


@dataclass
class PrunePlan:
    """Kept indices per module axis (``"out"``, ``"in"``, ``"bn"``, ``"dw"``), original numbering."""

    keep: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    threshold: float | None = None
    policy: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keep)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "threshold": self.threshold, "policy": self.policy, "keep": self.keep}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a slimnet plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        keep = {m: {k: [int(i) for i in idx] for k, idx in axes.items()} for m, axes in data["keep"].items()}
        return cls(keep=keep, threshold=data.get("threshold"), policy=data.get("policy", {}))

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls.from_dict(json.loads(text))

    def then(self, later: PrunePlan) -> PrunePlan:
        """The plan equivalent to applying ``self`` and then ``later`` (iterative pruning)."""
        keep = {m: dict(axes) for m, axes in self.keep.items()}
        for module, axes in later.keep.items():
            for kind, idx in axes.items():
                before = keep.get(module, {}).get(kind)
                keep.setdefault(module, {})[kind] = [before[i] for i in idx] if before is not None else idx
        return PrunePlan(keep=keep, threshold=later.threshold, policy=later.policy)


@dataclass
class PlanDecision:
    """What the policy decided, for reports: threshold used and per-group kept channels."""

    plan: PrunePlan
    threshold: float
    kept: dict[int, torch.Tensor]  # group id -> kept channel indices (sorted)
    floored: list[str] = field(default_factory=list)  # groups that hit min_channels


def group_scores(graph: ChannelGraph, model: nn.Module) -> dict[int, torch.Tensor]:
    """Per prunable group, each channel's importance: the largest |γ| any norm gives it."""
    modules = dict(model.named_modules())
    scores: dict[int, torch.Tensor] = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        per_norm = []
        for ref in group.norms:
            gamma = getattr(modules[ref.module], "weight", None)
            if gamma is None:  # affine=False: nothing to rank by
                continue
            flat = gamma.detach().abs().float().flatten()[ref.offset: ref.offset + group.size * ref.mult]
            per_norm.append(flat.view(group.size, ref.mult).amax(1).cpu())
        if per_norm:
            scores[group.id] = torch.stack(per_norm).amax(0)
    return scores


def all_gammas(graph: ChannelGraph, model: nn.Module) -> torch.Tensor:
    """|γ| of every BatchNorm entry in a prunable group: the population a ``percent`` ranks."""
    modules = dict(model.named_modules())
    names = sorted({ref.module for g in graph.groups if g.prunable for ref in g.norms})
    values = [modules[n].weight.detach().abs().float().flatten().cpu() for n in names
              if getattr(modules[n], "weight", None) is not None]
    return torch.cat(values) if values else torch.empty(0)


def threshold_for_percent(gammas: torch.Tensor, percent: float) -> float:
    """The |γ| at or below which at most ``percent`` of all entries lie: the paper's global ranking.

    Channels are kept when |γ| > threshold. ``percent=0`` prunes nothing (the paper's
    ``sorted[int(n*p)]`` would still drop the smallest), and ties never push the cut past ``percent``:
    if the k-th and (k+1)-th smallest are equal, the threshold drops below the tie.
    """
    k = int(len(gammas) * percent)
    if k == 0 or len(gammas) == 0:
        return -math.inf
    ordered = torch.sort(gammas).values
    if k < len(ordered) and ordered[k] == ordered[k - 1]:
        below = ordered[ordered < ordered[k - 1]]
        return float(below[-1]) if len(below) else -math.inf
    return float(ordered[k - 1])


def _keep_count(n_strong: int, size: int, min_channels: int, round_to: int) -> int:
    keep = max(n_strong, min(min_channels, size), 1)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)  # round up: never prune more than asked
    return keep


def decide(
    graph: ChannelGraph,
    model: nn.Module,
    *,
    thresh: float | None = None,
    percent: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
) -> PlanDecision:
    """Turn |γ| and a policy into a plan. ``thresh`` wins over ``percent`` when both are given."""
    if thresh is None and percent is None:
        raise ValueError("give prune thresh=… (absolute |γ| threshold) or percent=… (fraction of channels)")
    if thresh is not None and not (thresh >= 0):  # also catches NaN
        raise ValueError(f"prune thresh must be a number >= 0, got {thresh}")
    if percent is not None and not (0 <= percent < 1):
        raise ValueError(f"prune percent must be in [0, 1), got {percent}")
    scores = group_scores(graph, model)
    policy = {"thresh": thresh, "percent": None if thresh is not None else percent,
              "min_channels": min_channels, "round_to": round_to}
    if thresh is None:
        thresh = threshold_for_percent(all_gammas(graph, model), percent)
    kept, floored = {}, []
    for gid, score in scores.items():
        n_strong = int((score > thresh).sum())
        n_keep = _keep_count(n_strong, len(score), min_channels, round_to)
        if n_keep > n_strong and n_strong < min(min_channels, len(score)):
            floored.append(graph.groups[gid].describe())
        if n_keep < len(score):
            # the strongest n_keep channels, in their original order
            kept[gid] = torch.sort(torch.topk(score, n_keep, sorted=False).indices).values
    if floored:
        warnings.warn(
            f"prune: {len(floored)} layer group(s) had fewer than min_channels={min_channels} channels "
            f"above |γ| > {thresh:.4g} and keep their strongest {min_channels}: " + "; ".join(floored),
            stacklevel=2,
        )
        if len(floored) == len(scores):
            warnings.warn(f"prune: threshold {thresh:.4g} is above every |γ| in the network: it removed "
                          "everything it could and every layer is at min_channels", stacklevel=2)
    plan = PrunePlan(
        keep=_axis_indices(graph, kept), threshold=thresh, policy=policy,
    )
    return PlanDecision(plan=plan, threshold=thresh, kept=kept, floored=floored)


def _axis_indices(graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> dict[str, dict[str, list[int]]]:
    """Expand kept channels per group into kept feature indices per module axis."""
    out: dict[str, dict[str, list[int]]] = {}
    for (module, kind), parts in graph.axes.items():
        if not any(gid in kept for gid, _, _ in parts):
            continue
        idx, offset = [], 0
        for gid, size, mult in parts:
            channels = kept[gid] if gid in kept else torch.arange(size)
            block = (channels[:, None] * mult + torch.arange(mult)[None, :]).flatten() + offset
            idx.append(block)
            offset += size * mult
        out.setdefault(module, {})[kind] = torch.cat(idx).tolist()
    return out


def groups_summary(graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> list[dict]:
    """One row per group: its layers, width before and after, and why it was left whole if it was."""
    rows = []
    for g in graph.groups:
        if not g.refs:
            continue
        rows.append({
            "layers": g.producers or sorted({r.module for r in g.refs}),
            "before": g.size,
            "after": int(len(kept[g.id])) if g.id in kept else g.size,
            "prunable": g.prunable,
            "frozen_by": g.frozen_by[:3],
        })
    return rows


__all__ = ["PrunePlan", "PlanDecision", "decide", "group_scores", "threshold_for_percent", "ChannelGroup"]
