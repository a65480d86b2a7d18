"""The valley cut (``thresh="auto"``): each layer cut where its own |γ| histogram has a valley.

Polarization (Zhuang et al., NeurIPS 2020) pushes every layer's γ into two clusters, one at zero and one
away from it, and its reference code sets no global budget: it cuts each layer at the valley between
them, so the threshold stops mattering. A global threshold or FLOPs target can land inside the upper
cluster and throw that advantage away; a per-layer valley cannot.

How a valley is found here, per BatchNorm layer (the reference walks a 100-bin histogram on [0, 1] to
its first local minimum, which on a few dozen channels often stops inside the low cluster), the first
of three tests that finds something:

* **A dip in the density.** A trained polarized layer rarely leaves its valley empty: a pile sits at
  exactly 0 (polarization clamps γ there) and a few stragglers are still on their way down through it.
  So |γ| (scaled by the layer's largest) is smoothed with a Gaussian kernel (reflected at 0), and the
  first local minimum from zero is a valley when the density there is at most DIP of both the pile at
  zero and the mean density of the channels above it (not their highest ripple), the pile at zero is the
  densest point below it and SPIKE times the layer's mean density (a cluster *at zero*, not a ripple in
  one spread), at least MIN_LOW channels lie below it and a tenth of the layer above it (a few outliers
  above a long tail are not a cluster). The threshold is that minimum.
* **An empty stretch.** Every gap between neighbouring sorted |γ| is a candidate, and one is a valley
  when it separates a cluster at zero from the rest: it is much wider than that cluster reaches from
  zero, than the layer's typical spacing and than a tenth of its largest |γ| (the constants below). The
  widest such gap wins and the threshold is its middle.
* **Channels at exactly γ = 0.** A single pile (L1's usual result, or a fresh model's γ = 1) has neither
  of the above: split anywhere it reaches past the split's width, and its density falls from zero without
  a dip. If it holds channels at exactly 0 (both penalties' proximal steps and polarization's clamp put
  them there), those and only those are cut: their output is the constant act(β), which the surgery
  folds into the next layer's bias, so removing them changes nothing (but at a zero-padded conv's
  border: engine/fold.py). On polarized default models (docs/distillation.md) 6 of 12 layers had a dip
  and the other 6 only their zeros.

A layer with none of these is kept whole and named: the cut says what it found and did, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimnet.engine.plan import norm_channels
from slimnet.graph import ChannelGraph

# A valley's empty stretch is at least twice as wide as the cluster below it reaches from 0, at least
# GAP_SPACINGS median spacings of the layer's sorted |γ|, and at least MIN_GAP of its largest |γ|; the
# cluster below holds at least MIN_LOW channels. Tuned on drawn |γ| (tests/test_valley.py): a single pile
# of 64 or more channels (uniform, exponential, half-normal) shows a valley in under 1 % of draws, two
# clusters of 16 or more are found in over 75 %.
TOP_FACTOR = 2.0
GAP_SPACINGS = 6.0
MIN_GAP = 0.1
MIN_LOW = 2
# The density test (module docstring): kernel width BANDWIDTH of the largest |γ| (the reference's bins
# are 0.01 on γ in [0, 1]; a few dozen channels need a wider kernel to not see ripples); a dip at most DIP
# of the pile at zero and of the upper cluster's mean density; the pile at zero at least SPIKE times the
# mean density. Tuned like the gap test (tests/test_valley.py) and on trained polarized layers.
BANDWIDTH = 0.08
DIP = 0.35
SPIKE = 2.0
GRID = 256
MIN_HIGH_SHARE = 0.1  # the upper cluster of a dip holds this share of the layer: a few outliers are not one


@dataclass
class Valley:
    """One layer's valley: ``threshold`` (None: no valley and no channel at γ = 0, the layer is kept
    whole), how many of its channels lie below and above it, the stretch ``(low_max, high_min)`` it sits
    in, and which test found it: ``"gap"``, ``"dip"`` or ``"zeros"`` (no valley: only the channels at
    exactly 0 are below the threshold)."""

    threshold: float | None
    below: int = 0
    above: int = 0
    gap: tuple[float, float] | None = None
    kind: str | None = None


def find_valley(values: torch.Tensor) -> Valley:
    """The valley of one layer's |γ| (see the module docstring)."""
    v = values.detach().abs().flatten().double().sort().values
    n = len(v)
    if n < 2 * MIN_LOW or float(v[-1]) <= 0:
        return Valley(None, 0, n)
    threshold, kind = _density_dip(v), "dip"
    if threshold is None:
        split, kind = _empty_stretch(v), "gap"
        threshold = None if split is None else float(v[split - 1] + v[split]) / 2
    if threshold is None:  # no valley: a run of channels at exactly 0 is still dead weight (module docstring)
        zeros = int((v == 0).sum())
        if not 0 < zeros < n:
            return Valley(None, 0, n)
        threshold, kind = float(v[zeros]) / 2, "zeros"
    split = int((v < threshold).sum())
    return Valley(threshold, split, n - split, (float(v[split - 1]), float(v[split])), kind)


def _empty_stretch(v: torch.Tensor) -> int | None:
    """Where the widest empty stretch that is a valley splits sorted ``v`` (``v[:split]`` is low), or None."""
    gaps = v.diff()
    low_top, low_count = v[:-1], torch.arange(1, len(v))  # the cluster below each stretch: its top, its size
    ok = ((gaps > 0) & (gaps >= TOP_FACTOR * low_top) & (gaps >= GAP_SPACINGS * gaps.median())
          & (gaps >= MIN_GAP * v[-1]) & (low_count >= MIN_LOW) & (low_count <= len(v) - MIN_LOW))
    if not bool(ok.any()):
        return None
    return int(torch.where(ok, gaps, torch.zeros_like(gaps)).argmax()) + 1


def _gauss(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * (d / BANDWIDTH) ** 2)


def _density_dip(v: torch.Tensor) -> float | None:
    """The threshold at the first dip of sorted ``v``'s smoothed density that is a valley, or None."""
    scale = float(v[-1])
    u = v / scale
    x = torch.linspace(0, 1, GRID, dtype=v.dtype)
    density = (_gauss(x[:, None] - u) + _gauss(x[:, None] + u)).sum(1)  # reflected at 0: a pile there is whole
    density = density / (density.mean() + 1e-300)  # in units of the layer's mean density on [0, 1]
    near_zero = int(2 * BANDWIDTH * (GRID - 1)) + 1  # the pile at zero: its peak within two kernel widths
    below = torch.searchsorted(u, x)  # channels under each grid point
    pile, peak_below = density[:near_zero].max(), density.cummax(0).values  # peak_below[i - 1]: max of [0, i)
    if pile < SPIKE:  # no cluster at zero: no dip can be a valley
        return None
    for i in range(near_zero, GRID - 1):
        if not (density[i] <= density[i - 1] and density[i] <= density[i + 1]):
            continue
        upper = (len(v) - int(below[i])) / len(v) / max(1 - float(x[i]), 1e-9)  # the upper cluster's mean density
        if (pile >= peak_below[i - 1] and density[i] <= DIP * min(pile, upper)
                and MIN_LOW <= int(below[i]) <= len(v) - max(MIN_LOW, MIN_HIGH_SHARE * len(v))):
            return float(x[i]) * scale
    return None


def valley_scores(graph: ChannelGraph, model: nn.Module, scores: dict[int, torch.Tensor]
                  ) -> tuple[dict[int, torch.Tensor], dict[str, Valley]]:
    """Per scored group, each channel's |γ| over its own layer's valley threshold (a channel stays when
    any norm of its group gives it more than 1; a norm without a valley keeps it: +inf), and each
    norm's ``Valley`` by module name."""
    modules = dict(model.named_modules())
    valleys: dict[str, Valley] = {}
    out: dict[int, torch.Tensor] = {}
    for gid in scores:
        group = graph.groups[gid]
        ratios = []
        for ref in group.norms:
            weight = getattr(modules[ref.module], "weight", None)
            if weight is None:
                continue
            if ref.module not in valleys:
                valleys[ref.module] = find_valley(weight)
            found = valleys[ref.module].threshold
            per_channel = norm_channels(weight.detach().abs(), ref, group)
            ratios.append(per_channel / found if found else torch.full_like(per_channel, float("inf")))
        out[gid] = torch.stack(ratios).amax(0) if ratios else torch.full((group.size,), float("inf"))
    return out, valleys


def valley_note(valleys: dict[str, Valley]) -> str | None:
    """What the valley cut found, for the report: where it cut, which layers had only their zeros cut and
    which had no valley and were kept whole."""
    if not valleys:
        return None
    cut = {n: v for n, v in valleys.items() if v.kind in ("gap", "dip")}
    zeros = sorted(n for n, v in valleys.items() if v.kind == "zeros")
    whole = sorted(n for n, v in valleys.items() if v.threshold is None)
    parts = []
    if cut:
        lo, hi = min(v.threshold for v in cut.values()), max(v.threshold for v in cut.values())
        parts.append(f"{len(cut)} of {len(valleys)} BatchNorm layers cut at the valley of their |γ| "
                     f"(thresholds {lo:.3g}–{hi:.3g})")
    if zeros:
        parts.append(f"{len(zeros)} showed no valley and lost only their channels at exactly γ = 0 "
                     f"({sum(valleys[n].below for n in zeros)} in all): {_names(zeros)}")
    if whole:
        parts.append(f"{len(whole)} showed no valley (one pile of |γ|) and were kept whole: {_names(whole)}")
    if zeros or whole:
        parts[-1] += "; percent= or target_flops= cuts them, or train them with sparsity.kind=polarization"
    return "thresh='auto': " + "; ".join(parts)


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
