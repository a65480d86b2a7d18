"""Channel spaces and layouts: the bookkeeping the channel analysis does its reasoning in.

A *space* is one run of channels born in one place (a conv's filters, a model input); spaces that must be
cut alike are merged through a union-find ``parent``. A *layout* is what one tensor's channel axis is made
of: its spaces in order, each seen through a block of ``mult`` features per channel (after ``flatten``).
"""

from __future__ import annotations

from dataclasses import dataclass


class _Space:
    """An atomic run of ``size`` channels; merged with others through a union-find ``parent``.

    ``blocks``: the run splits into this many equal blocks that must keep equal channel counts (set by
    grouped convs; 1 means no constraint). Only the root's values count.

    ``parts``: set when a ``chunk``/``split`` cut the run into consecutive sub-runs, each its own space
    from then on; layouts that name the whole run are read through :func:`expand`.
    """

    __slots__ = ("blocks", "frozen_by", "id", "parent", "parts", "size")

    def __init__(self, id_: int, size: int):
        self.id, self.size, self.parent, self.frozen_by, self.blocks = id_, size, self, [], 1
        self.parts: list[_Space] | None = None

    def root(self) -> _Space:
        node = self
        while node.parent is not node:
            node.parent = node.parent.parent  # path halving
            node = node.parent
        return node


@dataclass(frozen=True)
class Segment:
    """``space`` channels seen through a block of ``mult`` consecutive features per channel."""

    space: _Space
    mult: int = 1


Layout = tuple  # tuple[Segment, ...]: the spaces one tensor's channel axis is made of, in order


@dataclass(frozen=True)
class Stacked:
    """The layout of a tensor whose channels moved off dim 1: ``torch.stack(paths, 1)`` makes
    ``(N, P, C, H, W)`` with channels at ``dim`` 2 (skresnet's selective kernel). Only ops that know
    where the channels went (element-wise, softmax or reductions over other dims, stack) read it; any
    other op on it is unknown and leaves its channels whole."""

    layout: Layout
    dim: int


def expand(layout: Layout) -> Layout:
    """``layout`` with every space a chunk/split has cut replaced by its parts (same features, in order)."""
    if not any(seg.space.parts for seg in layout):
        return layout
    out = []
    for seg in layout:
        if seg.space.parts:
            out.extend(expand(tuple(Segment(p, seg.mult) for p in seg.space.parts)))
        else:
            out.append(seg)
    return tuple(out)


def layout_size(layout: Layout) -> int:
    return sum(seg.space.size * seg.mult for seg in layout)
