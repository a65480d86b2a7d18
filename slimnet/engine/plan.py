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
    """Kept indices per module axis (``"out"``, ``"in"``, ``"bn"``, ``"dw"``), original numbering.

    ``add_bias``: layers that had no bias and were given one (β folding), so that a replay on a fresh
    model has the same parameters as the pruned one.

    ``attrs``: module attributes the cut rewrites, ``{module: {attribute: value}}``: the split sizes a
    forward reads from its module (``self.splits``, ``self.c``), so the cut model splits where it must.
    """

    keep: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    threshold: float | None = None
    policy: dict = field(default_factory=dict)
    add_bias: list[str] = field(default_factory=list)
    attrs: dict[str, dict[str, object]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keep)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "threshold": self.threshold, "policy": self.policy, "keep": self.keep,
                "add_bias": self.add_bias, "attrs": self.attrs}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a slimnet plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        keep = {m: {k: [int(i) for i in idx] for k, idx in axes.items()} for m, axes in data["keep"].items()}
        return cls(keep=keep, threshold=data.get("threshold"), policy=data.get("policy", {}),
                   add_bias=list(data.get("add_bias", [])), attrs=dict(data.get("attrs", {})))

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
        add_bias = list(dict.fromkeys(self.add_bias + later.add_bias))
        attrs = {m: dict(a) for m, a in self.attrs.items()}
        for module, values in later.attrs.items():  # the later cut's sizes are the current ones
            attrs.setdefault(module, {}).update(values)
        return PrunePlan(keep=keep, threshold=later.threshold, policy=later.policy, add_bias=add_bias, attrs=attrs)


@dataclass
class PlanDecision:
    """What the policy decided, for reports: threshold used and per-group kept channels."""

    plan: PrunePlan
    threshold: float | None
    kept: dict[int, torch.Tensor]  # group id -> kept channel indices (sorted)
    floored: list[str] = field(default_factory=list)  # groups that hit min_channels
    # (channels, |γ|) of a tie the cut split by β, which ``thresh=threshold`` would cut whole or not at all
    split_tie: tuple[int, float] | None = None
    global_equivalent: bool = True  # False: per-layer scores (the valley cut) that no one threshold gives

    @property
    def reproduces(self) -> bool | None:
        """Whether ``thresh=threshold`` on the same model gives this very plan (None: no threshold)."""
        return None if self.threshold is None else self.split_tie is None and self.global_equivalent


def group_scores(graph: ChannelGraph, model: nn.Module) -> dict[int, torch.Tensor]:
    """Per prunable group, each channel's importance: the largest |γ| any norm gives it."""
    modules = dict(model.named_modules())
    scores: dict[int, torch.Tensor] = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        per_norm = [norm_channels(modules[ref.module].weight.detach().abs(), ref, group) for ref in group.norms
                    if getattr(modules[ref.module], "weight", None) is not None]  # affine=False: nothing to rank by
        if per_norm:
            scores[group.id] = torch.stack(per_norm).amax(0)
    return scores


def norm_channels(param: torch.Tensor, ref, group: ChannelGroup) -> torch.Tensor:
    """A norm's parameter as one value per channel of ``group`` (the largest over the ``mult`` entries)."""
    return _norm_entries(param, ref, group).amax(1)


def _group_betas(graph: ChannelGraph, model: nn.Module, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per scored group, each channel's largest β over its norms (0 where a norm has no β)."""
    modules = dict(model.named_modules())
    betas = {}
    for gid in scores:
        group = graph.groups[gid]
        per_norm = [norm_channels(modules[ref.module].bias.detach(), ref, group) for ref in group.norms
                    if getattr(modules[ref.module], "bias", None) is not None]
        betas[gid] = torch.stack(per_norm).amax(0) if per_norm else torch.zeros(group.size)
    return betas


def tie_broken(scores: dict[int, torch.Tensor], graph: ChannelGraph, model: nn.Module) -> dict[int, torch.Tensor]:
    """The scores with equal |γ| put in order by β, so that a cut can stop inside a tie.

    A sparse phase that drives γ to exactly zero (the λ controller, polarization's clamp at 0) leaves
    hundreds of channels tied, and a threshold cannot split them: a budget would cut them all and
    overshoot, a percent would cut none of them. Among equal |γ| the channel with the lower β goes
    first: once γ = 0 its output is ``act(β)``, and after a ReLU a channel with β ≤ 0 passes no gradient
    back to its γ, so it can never come back in fine-tuning, where one with β > 0 can. Among equal β too
    (a fresh model: every γ 1, every β 0) channels are taken evenly from every layer, by their position
    in it, so no layer is emptied first. Tied values are spread, in float64, over the gap to the next
    distinct score, so the order between distinct scores is unchanged.
    """
    ids = list(scores)
    if not ids:
        return scores
    betas = _group_betas(graph, model, scores)
    flat = torch.cat([scores[g].double() for g in ids])
    beta = torch.cat([betas[g].double() for g in ids])
    where = torch.cat([_position_in_layer(graph.groups[g]) for g in ids])
    values, counts = torch.unique(flat, return_counts=True)
    out = flat.clone()
    for i in (counts > 1).nonzero().flatten().tolist():
        value = values[i]
        above = values[i + 1] if i + 1 < len(values) else value + 1.0
        members = (flat == value).nonzero().flatten()
        members = members[torch.argsort(where[members], stable=True)]  # the second key first: sorts are stable
        members = members[torch.argsort(beta[members], stable=True)]
        out[members] = value + (above - value) / len(members) * torch.arange(len(members), dtype=torch.float64)
    return dict(zip(ids, torch.split(out, [len(scores[g]) for g in ids])))


def _position_in_layer(group: ChannelGroup) -> torch.Tensor:
    """Each channel's place in its block, in [0, 1): equal shares of every layer come first."""
    per_block = group.size // group.blocks
    return (torch.arange(group.size) % per_block).double() / per_block


def _entries(graph: ChannelGraph, model: nn.Module, scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per scored group, the |γ| of every norm entry of each channel, ``(size, entries per channel)``: the
    population a ``percent`` counts (the paper ranks every BatchNorm entry, as many as there are norms)."""
    modules = dict(model.named_modules())
    out = {}
    for gid in scores:
        group = graph.groups[gid]
        out[gid] = torch.cat([_norm_entries(modules[ref.module].weight.detach().abs(), ref, group)
                              for ref in group.norms if getattr(modules[ref.module], "weight", None) is not None], 1)
    return out


def _norm_entries(param: torch.Tensor, ref, group: ChannelGroup) -> torch.Tensor:
    """A norm's parameter as ``(channels of group, mult)``."""
    return param.float().flatten()[ref.offset: ref.offset + group.size * ref.mult].view(group.size, ref.mult).cpu()


def frozen_gamma(norm: nn.Module) -> str | None:
    """Why a norm's γ never gets a sparsity step (``requires_grad=False``, or a buffer as in
    FrozenBatchNorm2d), or None when it trains (or there is no γ)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    if not isinstance(weight, nn.Parameter):
        return f"{type(norm).__name__}: a buffer"
    return None if weight.requires_grad else "requires_grad=False"


def mark_frozen(graph: ChannelGraph, model: nn.Module, cut_frozen: bool = False) -> ChannelGraph:
    """Keep whole every group one of whose norms has a frozen γ (``frozen_gamma``), unless ``cut_frozen``.

    Such a γ was never sparsity-trained (a detector's frozen stages: mmdet's ``frozen_stages``,
    torchvision's ``trainable_backbone_layers``, FrozenBatchNorm2d): ranked with trained ones, its
    layer would be cut on its pretrained values, silently. Marks the graph in place like
    ``restrict_to`` (so reach, budget and decide see the same groups), adds one warning per reason to
    ``graph.warnings`` naming the groups, and returns the graph. Marking twice changes nothing.
    """
    if cut_frozen:
        return graph
    modules = dict(model.named_modules())
    held: dict[str, list[str]] = {}
    for group in graph.groups:
        if not group.prunable:  # already kept whole, with its own reason
            continue
        for why in sorted({why for ref in group.norms if (why := frozen_gamma(modules[ref.module]))}):
            reason = f"γ frozen ({why}): never sparsity-trained; pass cut_frozen=True to rank it anyway"
            group.frozen_by.append(reason)
            held.setdefault(reason, []).append(group.describe())
    for reason, names in held.items():
        graph.warnings.append(f"{len(names)} channel group(s) kept whole ({_groups(names, 6)}): {reason}")
    return graph


def _groups(names: list[str], limit: int) -> str:
    """Groups by their layers, ``;`` between groups (a group's own layers are listed with ``,``)."""
    more = f" (+{len(names) - limit} more groups)" if len(names) > limit else ""
    return "; ".join(names[:limit]) + more


def restrict_to(graph: ChannelGraph, within) -> ChannelGraph:
    """Cut only the groups that lie in the sub-modules ``within`` (dotted prefixes; ``""`` is the whole
    model; None: no restriction) and that their norms rank completely.

    A group may be cut when every norm ranking it is inside ``within`` and every layer producing it is
    followed by one of those norms; then the layers *outside* that read it lose the same channels: the
    cut crosses the boundary, as it must for the model to stay consistent. A producer without a norm
    of its own (a detector FPN's P6/P7 convs, merged with the normalised levels by the heads' shared
    convs) has no γ saying its channels are weak, so its group is left whole. Marks the graph in place
    and returns it.
    """
    if within is None:
        return graph
    prefixes = [within] if isinstance(within, str) else list(within)

    def inside(name: str) -> bool:
        return any(not p or name == p or name.startswith(p + ".") for p in prefixes)

    for group in graph.groups:
        if not group.prunable:
            continue
        norms = {ref.module for ref in group.norms}
        if not all(inside(n) for n in norms):
            group.frozen_by.append(f"outside the prune scope ({', '.join(prefixes)})")
        elif unranked := [p for p in group.producers if graph.norm_after.get(p) not in norms]:
            group.frozen_by.append(f"{', '.join(unranked)} make(s) channels of it with no norm to rank them")
    return graph


def why_nothing_cut(graph: ChannelGraph, model: nn.Module, min_channels: int) -> str:
    """Why a cut on ``graph`` (marked as the cut saw it) removes no channel, and what to change: the
    groups kept whole, by kind of reason, and the groups it can rank, held at ``min_channels``."""
    held = [g for g in graph.groups if g.norms and g.frozen_by]
    frozen = [g for g in held if any(r.startswith("γ frozen") for r in g.frozen_by)]
    other = [g for g in held if g not in frozen]
    ranked = group_scores(graph, model)
    parts = []
    if frozen:
        parts.append(f"{len(frozen)} channel group(s) have a frozen γ ({_groups([g.describe() for g in frozen], 3)}): "
                     "pass cut_frozen=True to rank them")
    if other:
        more = f" (+{len(other) - 1} more)" if len(other) > 1 else ""
        parts.append(f"{len(other)} group(s) are kept whole ({other[0].describe()}: {other[0].frozen_by[0]}{more})")
    if ranked:
        parts.append(f"the {len(ranked)} group(s) it can rank stay at min_channels={min_channels} or above "
                     "(lower min_channels)")
    elif not held:
        parts.append("no channel group has a norm with a γ to rank it by")
    return "; ".join(parts)


def threshold_for_percent(gammas: torch.Tensor, percent: float) -> float:
    """The |γ| of the k-th smallest entry, k = ⌊n · percent⌋: the paper's global ranking (Liu et al.).

    Channels are kept when |γ| > threshold. ``percent=0`` prunes nothing (-inf; the paper's
    ``sorted[int(n*p)]`` would still drop the smallest). A tie running across the k-th entry would cut
    past ``percent`` at this threshold: ``decide`` splits such a tie instead (``_percent_cutoff``).
    """
    k = int(len(gammas) * percent)
    if k == 0:
        return -math.inf
    return float(torch.kthvalue(gammas.float().cpu(), k).values)


def _percent_cutoff(graph: ChannelGraph, model: nn.Module, plain: dict[int, torch.Tensor],
                    percent: float) -> tuple[float, dict[int, torch.Tensor] | None]:
    """Where ``percent`` cuts: ``(threshold, None)`` when its k-th entry ends a run of equal |γ|, else
    ``(cut-off, tie-broken scores)``: the tie across the k-th entry is split, lowest β first, taking as
    many of its channels as fit in ``percent`` (never more).

    Dropping below such a tie (the old rule) cut nothing at all when most γ are equal: all 0 after the λ
    controller or polarization's clamp, all 1 in a fresh model.
    """
    entries = _entries(graph, model, plain)
    flat = torch.cat([e.flatten() for e in entries.values()]) if entries else torch.empty(0)
    value = threshold_for_percent(flat, percent)
    k = int(len(flat) * percent)
    if k == 0 or int((flat <= value).sum()) == k:
        return value, None  # the cut ends between distinct |γ|: a plain threshold is exact
    room = k - int((flat < value).sum())  # entries of the tie that still fit in percent
    broken = tie_broken(plain, graph, model)
    ids = list(plain)
    tied = torch.cat([plain[g] == value for g in ids])  # channels whose score is the tied |γ|
    score = torch.cat([broken[g] for g in ids])[tied]
    at = torch.cat([(entries[g] == value).sum(1) for g in ids])[tied]  # their entries in the tie
    order = torch.argsort(score)
    fits = int((torch.cumsum(at[order], 0) <= room).sum())
    # tie-broken scores of the tie start at `value` and of lower |γ| stay below it
    cutoff = float(score[order][fits - 1]) if fits else math.nextafter(value, -math.inf)
    return cutoff, broken


def _keep_count(n_strong: int, size: int, min_channels: int, round_to: int, blocks: int = 1) -> int:
    """Channels to keep: at least the strong ones, ``min_channels`` and one, rounded *up* to a multiple of
    ``round_to`` and to equal counts in each of ``blocks`` blocks (never prunes more than asked)."""
    keep = max(n_strong, min(min_channels, size), 1)
    step = math.lcm(round_to, blocks) if round_to > 1 else blocks
    if step > 1:
        keep = min(size, math.ceil(keep / step) * step)
    return keep


def _strongest(score: torch.Tensor, n_keep: int, blocks: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest scores (``n_keep / blocks`` per block), in original order."""
    if blocks == 1:
        return torch.sort(torch.topk(score, n_keep, sorted=False).indices).values
    per_block = score.view(blocks, -1)
    local = torch.topk(per_block, n_keep // blocks, dim=1, sorted=False).indices
    return torch.sort((local + torch.arange(blocks)[:, None] * per_block.shape[1]).flatten()).values


def decide(
    graph: ChannelGraph,
    model: nn.Module,
    *,
    thresh: float | None = None,
    percent: float | None = None,
    min_channels: int = 1,
    round_to: int = 1,
    tie_break: bool = False,
    scores: dict[int, torch.Tensor] | None = None,
) -> PlanDecision:
    """Turn |γ| and a policy into a plan. ``thresh`` wins over ``percent`` when both are given.

    ``tie_break``: ``thresh`` is on ``tie_broken`` scores (a FLOPs budget's thresholds come from them);
    a ``percent`` whose cut ends inside a tie splits it the same way. Then the threshold reported is the
    largest |γ| actually cut, and ``split_tie`` says when ``thresh=`` that would not give this plan.

    ``scores``: per-group channel scores to compare with ``thresh`` instead of |γ| (the valley cut's |γ|
    over each layer's own threshold); the threshold reported is then the largest |γ| actually cut."""
    if thresh is None and percent is None:
        raise ValueError("give prune thresh=… (absolute |γ| threshold) or percent=… (fraction of channels)")
    if thresh is not None and not (thresh >= 0):  # also catches NaN
        raise ValueError(f"prune thresh must be a number >= 0, got {thresh}")
    if percent is not None and not (0 <= percent < 1):
        raise ValueError(f"prune percent must be in [0, 1), got {percent}")
    policy = {"thresh": thresh, "percent": None if thresh is not None else percent,
              "min_channels": min_channels, "round_to": round_to}
    plain = group_scores(graph, model)
    own, scores = scores is not None, plain if scores is None else scores
    if thresh is None:
        thresh, broken = _percent_cutoff(graph, model, plain, percent)
        tie_break, scores = broken is not None, plain if broken is None else broken
    elif tie_break:
        scores = tie_broken(plain, graph, model)
    kept, floored = _kept(graph, scores, thresh, min_channels, round_to)
    split = None
    if own or tie_break:  # a ratio or a tie-broken score is no γ a user could pass: report the largest |γ| cut
        thresh = _largest_cut(plain, scores, kept, thresh)
    equivalent = True
    if own:
        again, _ = _kept(graph, plain, thresh, min_channels, round_to)
        equivalent = {g: v.tolist() for g, v in again.items()} == {g: v.tolist() for g, v in kept.items()}
    if tie_break and not own:
        again, again_floored = _kept(graph, plain, thresh, min_channels, round_to)
        split = _split_tie(plain, kept, again)
        floored = floored if split else again_floored  # floors as `thresh=` sees them, when it is the same cut
    if floored:
        warnings.warn(
            f"prune: {len(floored)} layer group(s) had fewer than min_channels={min_channels} channels "
            f"above |γ| > {thresh:.4g} and keep their strongest {min_channels}: " + "; ".join(floored),
            stacklevel=2,
        )
        if len(floored) == len(scores):
            warnings.warn(f"prune: threshold {thresh:.4g} is above every |γ| in the network: it removed "
                          "everything it could and every layer is at min_channels", stacklevel=2)
    plan = plan_for(graph, kept, threshold=thresh, policy=policy)
    return PlanDecision(plan=plan, threshold=thresh, kept=kept, floored=floored, split_tie=split,
                        global_equivalent=equivalent)


def _kept(graph: ChannelGraph, scores: dict[int, torch.Tensor], thresh: float, min_channels: int,
          round_to: int) -> tuple[dict[int, torch.Tensor], list[str]]:
    """Each cut group's kept channels (the strongest, in original order; groups kept whole are absent),
    and the groups ``min_channels`` held above what ``thresh`` asked."""
    counts, floored = {}, []
    for gid, score in scores.items():
        blocks = graph.groups[gid].blocks
        strong = score > thresh
        n_strong = int(strong.sum())
        # equal blocks (a grouped conv's groups) keep as many as the block with the most strong channels
        n_need = n_strong if blocks == 1 else int(strong.view(blocks, -1).sum(1).max()) * blocks
        counts[gid] = _keep_count(n_need, len(score), min_channels, round_to, blocks)
        if counts[gid] > n_need and n_strong < min(min_channels, len(score)):
            floored.append(graph.groups[gid].describe())
    counts = _tied_counts(graph, counts, round_to)
    kept = {gid: _strongest(scores[gid], n, graph.groups[gid].blocks)
            for gid, n in counts.items() if n < len(scores[gid])}
    return kept, floored


def _removed(kept: dict[int, torch.Tensor], gid: int, size: int) -> torch.Tensor:
    """A group's channels the cut removes, as a mask (none when the group is kept whole)."""
    mask = torch.zeros(size, dtype=torch.bool)
    if gid in kept:
        mask[:] = True
        mask[kept[gid]] = False
    return mask


def _largest_cut(plain: dict[int, torch.Tensor], scores: dict[int, torch.Tensor], kept: dict[int, torch.Tensor],
                 cutoff: float) -> float:
    """The largest |γ| among the channels actually removed: not one ``min_channels`` kept, whose γ passed
    back as ``thresh=`` would cut the whole tie it sits in. With nothing removed, the largest under the
    cut-off (-inf when there is none)."""
    cut = [plain[g][_removed(kept, g, len(plain[g]))] for g in kept]
    if cut and len(values := torch.cat(cut)):
        return float(values.max())
    under = [plain[g][scores[g] <= cutoff] for g in scores]
    under = torch.cat(under) if under else torch.empty(0)
    return float(under.max()) if len(under) else -math.inf


def _split_tie(plain: dict[int, torch.Tensor], kept: dict[int, torch.Tensor],
               again: dict[int, torch.Tensor]) -> tuple[int, float] | None:
    """None when ``again`` (the plan of the reported threshold, without tie-breaking) is ``kept``; else
    ``(channels, |γ|)`` of the tie the cut split by β, which a threshold cuts whole or not at all."""
    differ = [plain[g][_removed(kept, g, len(plain[g])) ^ _removed(again, g, len(plain[g]))]
              for g in set(kept) | set(again)]
    differ = torch.cat(differ) if differ else torch.empty(0)
    if not len(differ):
        return None
    value = differ.max()
    return int(sum(int((s == value).sum()) for s in plain.values())), float(value)


def _tied_counts(graph: ChannelGraph, counts: dict[int, int], round_to: int) -> dict[int, int]:
    """Counts that honour the graph's ties (kept / k equal across a tie): each tie keeps, per k, the most
    any member needs, stepped so every member stays a multiple of its blocks and ``round_to``; a tie
    with a member that has no count (nothing ranks it, or kept whole) keeps every member whole. Counts
    only grow, so repeating until nothing changes settles groups that sit in several ties."""
    counts = dict(counts)
    changed = True
    while changed:
        changed = False
        for tie in graph.ties:
            groups = [graph.groups[g] for g, _ in tie]
            if any(g not in counts for g, _ in tie):
                changed |= any(counts.pop(g, None) is not None for g, _ in tie)  # absent = kept whole
                continue
            step = 1
            for (g, k), group in zip(tie, groups):
                need = math.lcm(group.blocks, round_to)  # kept(g) = t * k must be a multiple of this
                step = math.lcm(step, need // math.gcd(need, k))
            per_k = max(math.ceil(counts[g] / k) for g, k in tie)
            per_k = min(math.ceil(per_k / step) * step, min(group.size // k for (_, k), group in zip(tie, groups)))
            for (g, k), group in zip(tie, groups):
                if per_k * k >= group.size:  # kept whole: absent, like a group nothing ranks
                    changed |= counts.pop(g, None) is not None
                elif counts[g] != per_k * k:
                    counts[g], changed = per_k * k, True
    return counts


def drop_untied(graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``kept`` without the cuts that break a tie (members keeping different counts per k): those
    groups are left whole, so a plan made without ranking (``prune_zeroed``) stays consistent."""
    kept = dict(kept)
    changed = True
    while changed:
        changed = False
        for tie in graph.ties:
            per_k = {len(kept[g]) // k if g in kept and len(kept[g]) % k == 0 else None for g, k in tie}
            if len(per_k) > 1 or None in per_k and any(g in kept for g, _ in tie):
                changed |= any(kept.pop(g, None) is not None for g, _ in tie)
    return kept


def plan_for(graph: ChannelGraph, kept: dict[int, torch.Tensor], *, threshold: float | None = None,
             policy: dict | None = None) -> PrunePlan:
    """The plan that keeps ``kept[group id]`` (sorted channel indices) of each group, all of the others."""
    return PrunePlan(keep=_axis_indices(graph, kept), threshold=threshold, policy=policy or {},
                     attrs=_size_attrs(graph, kept))


def _size_attrs(graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> dict[str, dict[str, object]]:
    """New values of the split-size attributes the graph found: each part's kept channel count."""
    out: dict[str, dict[str, object]] = {}
    for module, attr, kind, parts in graph.size_attrs:
        counts = [sum(len(kept[g]) if g in kept else graph.groups[g].size for g in part) for part in parts]
        before = [sum(graph.groups[g].size for g in part) for part in parts]
        if counts != before:
            out.setdefault(module, {})[attr] = counts if kind == "list" else counts[0]  # "int": tied, all equal
    return out


def _axis_indices(graph: ChannelGraph, kept: dict[int, torch.Tensor]) -> dict[str, dict[str, list[int]]]:
    """Expand kept channels per group into kept feature indices per module axis."""
    out: dict[str, dict[str, list[int]]] = {}
    as_lists = {gid: idx.tolist() for gid, idx in kept.items()}
    for (module, kind), parts in graph.axes.items():
        if not any(gid in kept for gid, _, _ in parts):
            continue
        idx, offset = [], 0
        for gid, size, mult in parts:
            channels = as_lists[gid] if gid in kept else range(size)
            if mult == 1:  # the common case (no flatten): plain ints, no tensor ops
                idx.extend(c + offset for c in channels)
            else:  # flatten: channel c is features c*mult ... c*mult + mult - 1
                idx.extend(offset + c * mult + j for c in channels for j in range(mult))
            offset += size * mult
        out.setdefault(module, {})[kind] = idx
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
            "after": len(kept[g.id]) if g.id in kept else g.size,
            "prunable": g.prunable,
            "frozen_by": g.frozen_by[:3],
        })
    return rows


__all__ = ["ChannelGroup", "PlanDecision", "PrunePlan", "decide", "group_scores", "mark_frozen", "plan_for",
           "restrict_to", "threshold_for_percent", "why_nothing_cut"]
