"""The valley cut (``thresh="auto"``): each layer cut where its own |γ| histogram has a valley.

Polarization (Zhuang et al., NeurIPS 2020) pushes every layer's γ into two clusters, one at zero and one
away from it, and its reference code sets no global budget: it cuts each layer at the valley between
them, so the threshold stops mattering. A global threshold or FLOPs target can land inside the upper
cluster and throw that advantage away; a per-layer valley cannot.

How a valley is found here, per BatchNorm layer (the reference walks a 100-bin histogram on [0, 1] to
its first local minimum, which on a few dozen channels often stops inside the low cluster): every empty
stretch between neighbouring sorted |γ| of the layer is a candidate, and one is a valley when it
separates a cluster at zero from the rest — it is much wider than that cluster reaches from zero, than
the layer's typical spacing and than a tenth of its largest |γ| (the constants below). The widest such
stretch wins, and the threshold is its middle: the cut removes the low cluster, whatever threshold inside
the gap one would have picked. A single pile (L1's usual result, or a fresh model's γ = 1), split
anywhere, reaches past the split's width, so it has none.

A layer without a valley is kept whole and named: the cut says what it found and did, never silently.
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


@dataclass
class Valley:
    """One layer's valley: ``threshold`` (None: no valley, the layer is kept whole), how many of its
    channels lie below and above it, and the empty stretch ``(low_max, high_min)`` it sits in."""

    threshold: float | None
    below: int = 0
    above: int = 0
    gap: tuple[float, float] | None = None


def find_valley(values: torch.Tensor) -> Valley:
    """The valley of one layer's |γ| (see the module docstring)."""
    v = values.detach().abs().flatten().double().sort().values
    n = len(v)
    if n < 2 or float(v[-1]) <= 0:
        return Valley(None, 0, n)
    # Every empty stretch between neighbours is a candidate; one is a valley when it separates a cluster at
    # zero from the rest (the constants above; a single pile split anywhere reaches past the split's width).
    gaps = v.diff()
    low_top, low_count = v[:-1], torch.arange(1, n)  # the cluster below each stretch: its top, its size
    ok = ((gaps > 0) & (gaps >= TOP_FACTOR * low_top) & (gaps >= GAP_SPACINGS * gaps.median())
          & (gaps >= MIN_GAP * v[-1]) & (low_count >= MIN_LOW))
    if not bool(ok.any()):
        return Valley(None, 0, n)
    split = int(torch.where(ok, gaps, torch.zeros_like(gaps)).argmax()) + 1  # the widest: v[:split] is low
    low_max, high_min = float(v[split - 1]), float(v[split])
    return Valley((low_max + high_min) / 2, split, n - split, (low_max, high_min))


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
    """What the valley cut found, for the report: where it cut and which layers had no valley."""
    cut = {n: v for n, v in valleys.items() if v.threshold is not None}
    whole = sorted(n for n, v in valleys.items() if v.threshold is None)
    if not valleys:
        return None
    parts = []
    if cut:
        lo, hi = min(v.threshold for v in cut.values()), max(v.threshold for v in cut.values())
        parts.append(f"{len(cut)} of {len(valleys)} BatchNorm layers cut at the valley of their |γ| "
                     f"(thresholds {lo:.3g}–{hi:.3g})")
    if whole:
        shown = ", ".join(whole[:4]) + (f" and {len(whole) - 4} more" if len(whole) > 4 else "")
        parts.append(f"{len(whole)} showed no valley (one pile of |γ|) and were kept whole: {shown}; "
                     "percent= or target_flops= cuts them, or train them with sparsity.kind=polarization")
    return "thresh='auto': " + "; ".join(parts)
