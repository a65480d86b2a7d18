"""What the channel analysis returns: channel groups, the parameter axes that see them, and the graph.

Everything downstream (``plan``, ``surgery``, ``zeroed``, ``fold``, ``reach``) reads these types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AxisRef:
    """One parameter axis of one module that sees a group's channels.

    ``kind`` is ``"out"`` (a conv's filters / a linear's outputs: weight dim 0), ``"in"`` (weight
    dim 1), ``"bn"`` (a norm's per-channel entries) or ``"dw"`` (a depthwise conv: filters, inputs and
    groups together). Channel ``c`` of the group occupies features ``offset + c*mult ... + mult - 1``.
    """

    module: str
    kind: str
    offset: int
    mult: int


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together, and every axis that sees them.

    ``blocks > 1``: the channels split into that many equal consecutive blocks (a grouped conv's groups)
    that must all keep the same number of channels.
    """

    id: int
    size: int
    refs: list[AxisRef] = field(default_factory=list)
    frozen_by: list[str] = field(default_factory=list)
    blocks: int = 1

    @property
    def producers(self) -> list[str]:
        return sorted({r.module for r in self.refs if r.kind == "out"})

    @property
    def norms(self) -> list[AxisRef]:
        return [r for r in self.refs if r.kind == "bn"]

    @property
    def consumers(self) -> list[str]:
        return sorted({r.module for r in self.refs if r.kind == "in"})

    @property
    def sliceable(self) -> bool:
        """Not frozen and born in a layer we can slice: channels can be removed (``prune_zeroed``)."""
        return not self.frozen_by and bool(self.producers)

    @property
    def prunable(self) -> bool:
        """Cut only what is understood: not frozen, born in a layer we can slice, ranked by a BN."""
        return self.sliceable and bool(self.norms)

    def describe(self) -> str:
        return listing(layer_names(self), 4)


@dataclass
class ChannelGraph:
    """The channel groups of a model, and for each sliceable axis the layout it sees."""

    groups: list[ChannelGroup]
    axes: dict[tuple[str, str], list[tuple[int, int, int]]]  # (module, kind) -> [(group id, size, mult)]
    warnings: list[str] = field(default_factory=list)
    # conv/linear -> the BatchNorm that alone reads its output (a constant added to the layer's output
    # can be absorbed there, through the running mean, when the layer has no bias)
    norm_after: dict[str, str] = field(default_factory=dict)
    # groups that must keep equal counts: each tie is [(group id, k)], kept(group) / k equal for all
    # (the parts of a chunk, the blocks of a grouped conv fed by a concatenation)
    ties: list[list[tuple[int, int]]] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=dict)  # conv/linear -> FLOPs (2 x MACs) per sample
    # conv/linear -> output positions per sample (see `measure.weight_uses`); None when something else
    # computes (a matmul, a black-box leaf with weights) or a shape is unknown
    uses: dict[str, int] | None = None
    # split sizes a cut rewrites: (module, attribute, "list" | "int", group ids of each part); see `split`
    size_attrs: list[tuple[str, str, str, list[list[int]]]] = field(default_factory=list)
    # kinds of op the analysis does not model: their sizes may come from a tensor's shape at run time
    # (``x.view(B, C, H, W)`` with ``C`` from another tensor), which the graph cannot tie to a group
    unknown_ops: list[str] = field(default_factory=list)

    def group_of(self, module: str, kind: str = "out") -> ChannelGroup:
        """The group a module's axis belongs to (its first segment's group)."""
        gid = self.axes[(module, kind)][0][0]
        return self.groups[gid]


def layer_names(group: ChannelGroup) -> list[str]:
    return group.producers or sorted({r.module for r in group.refs})


def listing(names: list[str], limit: int, quote: bool = False) -> str:
    shown = [f"'{n}'" if quote else n for n in names[:limit]]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ("node " if quote and len(names) == 1 else "nodes " if quote else "") + ", ".join(shown) + more
