"""The channel analysis: one walk over a captured graph, in topological order, giving every tensor a
channel layout (``spaces``), merging the spaces that must be cut alike, and collecting the result
(``groups``). What each op does is the op table's business (``ops``, ``registry``); this file holds the
walk and the primitives handlers call: ``union``, ``cut_at``, ``freeze``, ``unknown``, ``record``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from slimnet.graph.groups import AxisRef, ChannelGraph, ChannelGroup, layer_names, listing
from slimnet.graph.ops import COMPUTE_OPS, NORM_TYPES, OPS
from slimnet.graph.outputs import output_leaves, path_key, shape_only_output_keys
from slimnet.graph.spaces import Layout, Segment, Stacked, _Space, expand, layout_size
from slimnet.graph.tracing import _capture, as_batch_of_two
from slimnet.modes import preserved_modes


class _Analysis:
    """Walks an fx graph once, in topological order, assigning a channel layout to every tensor."""

    def __init__(self, model: nn.Module, graph: fx.Graph, shapes: dict[str, torch.Size | None],
                 keep_whole: dict[str, str] | None = None):
        self.graph = graph
        self.keep_whole = keep_whole or {}  # module path -> why every tensor it reads or writes is left whole
        self.shape_only_keys = shape_only_output_keys(model)
        self.modules = dict(model.named_modules())
        self.shapes = shapes
        self.spaces: list[_Space] = []
        self.layout: dict[fx.Node, object] = {}  # node -> Layout | tuple of layouts | None
        self.axes: dict[tuple[str, str], Layout] = {}
        self.module_out: dict[str, _Space] = {}  # a module called twice gives one output space
        self.unknowns: dict[str, tuple[list[str], list[_Space]]] = {}  # kind of op -> (nodes, spaces)
        self.unknown_kind: dict[fx.Node, str] = {}  # node of an unknown op -> its kind
        self.calls: Counter = Counter()  # module name -> times called
        self.norm_after: dict[str, list[str]] = {}  # conv/linear -> norms reading its output alone
        self.ties: list[list[tuple[_Space, int]]] = []  # [(space, k)]: kept(space) / k equal for all
        self.flops: Counter = Counter()  # conv/linear -> FLOPs per sample, over all its calls
        self.uses: Counter | None = Counter()  # conv/linear -> output positions per sample; None: unknown
        self.size_attrs: list[tuple[str, str, str, list[Layout]]] = []  # split sizes to rewrite, see `split`

    # -- helpers ------------------------------------------------------------------------------------
    def new_space(self, size: int, frozen_by: str | None = None) -> Layout:
        space = _Space(len(self.spaces), size)
        if frozen_by:
            space.frozen_by.append(frozen_by)
        self.spaces.append(space)
        return (Segment(space),)

    def freeze(self, layout, reason: str) -> None:
        if isinstance(layout, Stacked):
            layout = layout.layout
        if isinstance(layout, tuple) and layout and isinstance(layout[0], Segment):
            for seg in expand(layout):
                seg.space.root().frozen_by.append(reason)
        elif isinstance(layout, (tuple, list)):
            for item in layout:
                self.freeze(item, reason)

    def union(self, a: Layout, b: Layout, reason: str) -> Layout:
        """Merge two layouts channel by channel; if their structures differ, freeze both.

        Layouts of the same width whose spaces end in different places (``cat(a, b) * gate``, the gate
        one conv's output) are first cut at every boundary of either, so both are the same runs.
        """
        a, b = expand(a), expand(b)
        if ([s.space.size for s in a] != [s.space.size for s in b] and layout_size(a) == layout_size(b)
                and all(seg.mult == 1 for seg in a + b)):
            ends = sorted({e for lay in (a, b) for e in itertools.accumulate(s.space.size for s in lay)})
            sizes = [e - s for s, e in zip([0, *ends[:-1]], ends)]
            if self.cut_at(a, sizes) is not None and self.cut_at(b, sizes) is not None:
                a, b = expand(a), expand(b)
        if len(a) == len(b) and all(x.space.size == y.space.size and x.mult == y.mult for x, y in zip(a, b)):
            for x, y in zip(a, b):
                ra, rb = x.space.root(), y.space.root()
                if ra is not rb:
                    rb.parent = ra
                    ra.frozen_by.extend(rb.frozen_by)
                    self.constrain(ra, rb.blocks, reason)
            return a
        self.freeze(a, reason)
        self.freeze(b, reason)
        return a

    @staticmethod
    def constrain(root: _Space, blocks: int, reason: str) -> None:
        """Add "keep equal counts in ``blocks`` equal blocks" to a space's constraint.

        Equal counts per block of a finer partition imply equal counts per block of any coarser one it
        refines, so two constraints combine into their least common multiple, when that divides the size.
        """
        combined = math.lcm(root.blocks, blocks)
        if root.size % combined:
            root.frozen_by.append(f"{reason}: blocks of {root.blocks} and {blocks} do not nest")
        else:
            root.blocks = combined

    def grouped(self, layout: Layout, groups: int, reason: str) -> None:
        """A grouped conv's axis: every segment must cover whole blocks, which then keep equal counts.

        Segments of different spaces (a concatenation feeding the conv) are tied: each keeps the same
        count per block, so conv-group ``g`` still reads as many channels as every other group.
        """
        layout = expand(layout)
        block = layout_size(layout) // groups
        offset = 0
        for seg in layout:
            size = seg.space.size * seg.mult
            if seg.mult != 1 or offset % block or size % block:
                self.freeze(layout, reason)
                return
            offset += size
        for seg in layout:
            self.constrain(seg.space.root(), seg.space.size // block, reason)
        if len({seg.space.root().id for seg in layout}) > 1:
            self.ties.append([(seg.space, seg.space.size // block) for seg in layout])

    def shape(self, node) -> torch.Size | None:
        shape = self.shapes.get(node.name) if isinstance(node, fx.Node) else None
        return shape if isinstance(shape, torch.Size) else None

    def part_shapes(self, node) -> tuple | None:
        """The shapes of the tensors an op returned as a tuple (``chunk``, ``split``), else None."""
        shapes = self.shapes.get(node.name) if isinstance(node, fx.Node) else None
        return shapes if isinstance(shapes, tuple) and not isinstance(shapes, torch.Size) else None

    def tensor_layout(self, arg):
        """Layout of an argument that is a channel-carrying tensor, else None."""
        if isinstance(arg, fx.Node):
            lay = self.layout.get(arg)
            if isinstance(lay, tuple) and lay and isinstance(lay[0], Segment):
                return expand(lay)
        return None

    def input_layout(self, node):
        """Layout of the op's first argument, if it is a channel-carrying tensor, else None."""
        return self.tensor_layout(node.args[0]) if node.args else None

    def stacked_layout(self, arg) -> Stacked | None:
        lay = self.layout.get(arg) if isinstance(arg, fx.Node) else None
        return Stacked(expand(lay.layout), lay.dim) if isinstance(lay, Stacked) else None

    def fresh_output(self, node, reason: str):
        shape = self.shape(node)
        if shape is not None and len(shape) >= 2:
            return self.new_space(int(shape[1]), reason)
        return None

    def unknown(self, node, what: str, kind: str | None = None):
        """An op we do not model: leave every group it touches whole, and say so (once per ``kind``)."""
        reason = f"unknown op {what} at node '{node.name}'"
        touched = [self.tensor_layout(a) or getattr(self.stacked_layout(a), "layout", None)
                   for a in node.all_input_nodes]
        touched = [t for t in touched if t is not None]
        out = self.fresh_output(node, reason)
        if touched:
            self.freeze(touched, reason)
            nodes, spaces = self.unknowns.setdefault(kind or what, ([], []))
            self.unknown_kind[node] = kind or what
            nodes.append(node.name)
            spaces.extend(seg.space for lay in touched + ([out] if out else []) for seg in lay)
        return out

    def record(self, module: str, kind: str, layout: Layout) -> None:
        key = (module, kind)
        if key in self.axes:  # a module called more than once: all its inputs must be cut alike
            self.union(self.axes[key], layout, f"shared module '{module}' sees different channels")
        else:
            self.axes[key] = layout

    def output_space(self, module: str, size: int) -> Layout:
        if module not in self.module_out:
            self.module_out[module] = self.new_space(size)[0].space
            self.axes[(module, "out")] = (Segment(self.module_out[module]),)
        return expand((Segment(self.module_out[module]),))

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Give every node a layout, in topological order (fx graphs are)."""
        for node in self.graph.nodes:
            if node.op == "placeholder":
                self.layout[node] = self.fresh_output(node, "model input")
            elif node.op == "get_attr":
                self.layout[node] = None
            elif node.op == "call_module":
                self.layout[node] = self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.layout[node] = self.call_function(node)
            elif node.op == "output":
                self.output(node)
        if self.keep_whole:
            self.freeze_kept_whole()

    def freeze_kept_whole(self) -> None:
        """Every node run by a module kept whole: what it reads and what it writes keep every channel, so
        the module's inputs and outputs do too (its ops may read channel counts the graph cannot see).
        After the walk, so that a group already left whole for another reason is still named by that one."""
        for node in self.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            if node.op == "call_module":
                stack.append(node.target)
            for path, reason in self.keep_whole.items():
                if any(p == path or p.startswith(path + ".") for p in stack):
                    self.freeze([self.layout.get(a) for a in node.all_input_nodes] + [self.layout.get(node)], reason)
                    break

    def output(self, node) -> None:
        """The model's outputs keep their channels, except those read only for their shape
        (:data:`SHAPE_ONLY_OUTPUTS`): a tensor returned under such a key *and* elsewhere is kept whole."""
        frozen = [n for path, n in output_leaves(node) if isinstance(n, fx.Node)
                  and not any(path_key(k) in self.shape_only_keys for k in path)]
        self.freeze([self.layout.get(n) for n in frozen], "model output")


    def call_module(self, node):
        """Count the layer's FLOPs, then hand the node to its module's handler (unknown if none)."""
        name, m = node.target, self.modules[node.target]
        self.calls[name] += 1
        handler = OPS.module(m)
        if any(self.stacked_layout(a) for a in node.all_input_nodes) and not getattr(handler, "reads_stacked", False):
            return self.unknown(node, f"{type(m).__name__} ('{name}') on stacked channels", "module on stacked channels")
        x = self.input_layout(node)
        if x is None:
            what = f"{type(m).__name__} on an input without channels"
            return self.unknown(node, f"{type(m).__name__} ('{name}') on an input without channels", what)
        if isinstance(m, (_ConvNd, nn.Linear)) and (positions := self.weight_positions(node, m)) is not None:
            # 2 x MACs per sample: one MAC per weight per position (see `weight_positions`)
            self.flops[name] += 2 * m.weight.numel() * positions
            if self.uses is not None:
                self.uses[name] += positions
        elif isinstance(m, (_ConvNd, nn.Linear)) or (
                not isinstance(m, NORM_TYPES) and any(True for _ in m.parameters(recurse=False))):
            self.uses = None  # an unknown shape, or a black box with weights
        if handler is None:
            return self.unknown(node, f"{type(m).__name__} ('{name}')", type(m).__name__)
        return handler(self, node)

    def weight_positions(self, node, m: nn.Module) -> int | None:
        """Positions per sample at which every weight of ``m`` is used once: a conv's output positions
        (a linear's: all but the batch and feature dims), a transposed conv's *input* positions."""
        transposed = isinstance(m, _ConvNd) and m.transposed
        shape = self.shape(node.args[0] if transposed else node)
        if shape is None or len(shape) < 2:
            return None
        channels = shape[-1] if isinstance(m, nn.Linear) else shape[1]
        return math.prod(shape) // max(int(shape[0]) * int(channels), 1)

    def call_function(self, node):
        """Hand a function or method node to its handler; without one, an op on channels is unknown."""
        fn = node.target
        if str(getattr(fn, "__name__", fn)).split(".")[0] in COMPUTE_OPS:
            self.uses = None  # FLOPs outside conv and linear layers: shapes of those alone do not count them
        handler = OPS.function(node)
        if any(self.stacked_layout(a) for a in node.all_input_nodes) and not getattr(handler, "reads_stacked", False):
            name = fn if node.op == "call_method" else getattr(fn, "__name__", str(fn))
            what = f"'{name}' of channels moved off dim 1 by a stack or view (e.g. a channel shuffle)"
            return self.unknown(node, what, what)
        if handler is not None:
            return handler(self, node)
        return self.opaque_or_fresh(node)

    def opaque_or_fresh(self, node):
        """An op without a handler: nothing channel-carrying goes in (shape arithmetic, constants), a new
        space if its result has channels; else an unknown op."""
        if not node.all_input_nodes or all(self.tensor_layout(a) is None for a in node.all_input_nodes):
            shape = self.shape(node)
            return self.new_space(int(shape[1]), f"tensor made at node '{node.name}'") if (
                shape is not None and len(shape) >= 2) else None
        fn = node.target
        return self.unknown(node, fn if node.op == "call_method" else getattr(fn, "__name__", str(fn)))

    # -- primitives for cuts inside a space (split, slices, unstack) ---------------------------------
    def cut_at(self, layout: Layout, sizes: list[int]) -> list[Layout] | None:
        """``layout`` cut into consecutive runs of ``sizes`` channels, splitting spaces where a run ends
        inside one; None where a space cannot be split (flattened features, grouped-conv blocks, ties)."""
        bounds, total = [], 0
        for size in sizes[:-1]:
            total += size
            bounds.append(total)
        for bound in bounds:
            offset = 0
            for seg in expand(layout):
                size = seg.space.size * seg.mult
                if offset < bound < offset + size:
                    if seg.mult != 1 or not self.split_space(seg.space, bound - offset):
                        return None
                    break
                offset += size
        pieces, current, offset, bounds = [], [], 0, bounds + [total + sizes[-1]]
        for seg in expand(layout):
            current.append(seg)
            offset += seg.space.size * seg.mult
            if offset == bounds[len(pieces)]:
                pieces.append(tuple(current))
                current = []
        return pieces

    def split_space(self, space: _Space, at: int) -> bool:
        """Cut ``space`` after its first ``at`` channels, and every space merged with it alike."""
        root = space.root()
        if root.blocks > 1 or any(s.root() is root for tie in self.ties for s, _ in tie):
            return False
        members = [s for s in self.spaces if s.parts is None and s.root() is root]
        heads = None
        for member in members:
            member.parts = [self.new_space(at)[0].space, self.new_space(member.size - at)[0].space]
            if heads is None:
                heads = member.parts
                for part in heads:
                    part.frozen_by = list(root.frozen_by)
            else:
                for part, head in zip(member.parts, heads):
                    part.parent = head
        return True


    # -- results ------------------------------------------------------------------------------------
    def check_shared_bounds(self) -> None:
        """One attribute bounding several slices (or parts) must come out of the cut with one value: every
        record of it must count the same groups, else all of them are left whole."""
        by_attr: dict[tuple[str, str], list[list[Layout]]] = {}
        for module, attr, _, pieces in self.size_attrs:
            by_attr.setdefault((module, attr), []).append(pieces)
        for (module, attr), records in by_attr.items():
            counted = {tuple(tuple(sorted(seg.space.root().id for seg in expand(piece))) for piece in pieces)
                       for pieces in records}
            if len(counted) > 1:
                self.freeze([piece for pieces in records for piece in pieces],
                             f"'{module}'.{attr} bounds slices of different channels")

    def result(self) -> ChannelGraph:
        self.check_shared_bounds()
        live = [space for space in self.spaces if space.parts is None]  # a split space lives on in its parts
        roots: dict[int, ChannelGroup] = {}
        for space in live:
            root = space.root()
            if root.id not in roots:
                roots[root.id] = ChannelGroup(id=len(roots), size=root.size)
        for space in live:
            group = roots[space.root().id]
            group.blocks = space.root().blocks
            for reason in space.frozen_by:
                if reason not in group.frozen_by:
                    group.frozen_by.append(reason)
        axes = {}
        for (module, kind), layout in self.axes.items():
            offset, parts = 0, []
            for seg in expand(layout):
                group = roots[seg.space.root().id]
                group.refs.append(AxisRef(module, kind, offset, seg.mult))
                parts.append((group.id, seg.space.size, seg.mult))
                offset += seg.space.size * seg.mult
            axes[(module, kind)] = parts
        groups = sorted(roots.values(), key=lambda g: g.id)
        ties = self._tied_groups(roots, groups)
        warnings = []
        frozen_with_norm = set()
        for g in groups:  # say what is out of reach: every frozen group a norm could have ranked
            if g.frozen_by and g.norms:
                frozen_with_norm.add(g.id)
                more = f" (+{len(g.frozen_by) - 1} more reason(s))" if len(g.frozen_by) > 1 else ""
                warnings.append(f"{g.describe()} kept whole: {g.frozen_by[0]}{more}")
        for kind, (nodes, spaces) in self.unknowns.items():
            # the model's input and output channels are never cut anyway, and channels no layer sees
            # cannot be: an op on those alone costs nothing; groups with a norm were named above
            live_spaces = [seg.space for s in spaces for seg in expand((Segment(s),))]  # split ones: their parts
            touched = [g for g in {roots[s.root().id].id: roots[s.root().id] for s in live_spaces}.values()
                       if g.refs and g.id not in frozen_with_norm
                       and not any(r in ("model input", "model output") for r in g.frozen_by)]
            if not touched:
                continue
            kept = sorted({name for g in touched for name in layer_names(g)})
            warnings.append(f"unknown op {kind} at {listing(nodes, 3, quote=True)}: its channels are kept whole"
                            + (f" in {listing(kept, 4)}" if kept else ""))
        norm_after = {layer: norms[0] for layer, norms in self.norm_after.items()
                      if len(norms) == 1 and self.calls[layer] == 1 and self.calls[norms[0]] == 1}
        size_attrs = [(module, attr, kind, [[roots[seg.space.root().id].id for seg in expand(piece)]
                                            for piece in pieces])
                      for module, attr, kind, pieces in self.size_attrs]
        return ChannelGraph(groups=groups, axes=axes, warnings=warnings, norm_after=norm_after, ties=ties,
                            flops=dict(self.flops), size_attrs=size_attrs, unknown_ops=sorted(self.unknowns),
                            uses=dict(self.uses) if self.uses is not None else None)

    def _tied_groups(self, roots: dict[int, ChannelGroup], groups: list[ChannelGroup]) -> list:
        """Ties as group ids; a group tied to one that is left whole is left whole too (it cannot shrink
        alone), and a tie a group enters twice with different block counts freezes all its groups."""
        ties = []
        for tie in self.ties:
            members: dict[int, int] = {}
            for space, k in tie:
                for part in expand((Segment(space),)):  # a tied space split later: should not happen
                    gid = roots[part.space.root().id].id
                    if members.setdefault(gid, k) != k:
                        members[gid] = -1
            if len(members) > 1 or -1 in members.values():
                ties.append(sorted(members.items()))
        changed = True
        while changed:  # freezing spreads along ties until nothing changes
            changed = False
            for tie in ties:
                frozen = [groups[g] for g, k in tie if groups[g].frozen_by or k < 0]
                if not frozen:
                    continue
                reason = f"tied to {frozen[0].describe()}, which is kept whole ({(frozen[0].frozen_by or ['uneven blocks'])[0]})"
                for g, _ in tie:
                    if not groups[g].frozen_by:
                        groups[g].frozen_by.append(reason)
                        changed = True
        return [tie for tie in ties if not any(groups[g].frozen_by for g, _ in tie)]


def trace_channel_groups(model: nn.Module, example_inputs, leaf_modules=(),
                         keep_whole: dict[str, str] | None = None) -> ChannelGraph:
    """Trace ``model`` (``torch.fx``, else ``torch.export``) and return its channel groups.

    Args:
        model: any ``nn.Module`` whose forward ``torch.fx`` or ``torch.export`` can capture.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes matter, values do not).
        leaf_modules: module classes to keep as black boxes (their channels are left whole).
        keep_whole: module paths whose inputs, outputs and inner channels are left whole, each with the
            reason the warnings give (works on both capture paths; ``leaf_modules`` only on fx's).

    Raises:
        TraceError: neither way can capture the forward; the message names both causes and what to do.
    """
    with preserved_modes(model):
        model.train()  # the train-mode graph includes auxiliary heads that also consume channels
        graph, shapes = _capture(model, tuple(leaf_modules), as_batch_of_two(example_inputs))
    analysis = _Analysis(model, graph, shapes, keep_whole)
    analysis.run()
    return analysis.result()
