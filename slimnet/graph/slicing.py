"""``chunk`` / ``split`` and channel slices (``x[:, a:b]``): a run of channels cut into parts, each its own
space from then on (``analysis.cut_at``). Sizes the forward reads from a module attribute are rewritten by
the cut (``ChannelGraph.size_attrs`` -> ``PrunePlan.attrs``); sizes written in the code cannot follow a cut,
so what they touch is left whole, with a warning.
"""

from __future__ import annotations

from itertools import accumulate

from torch import fx

from slimnet.graph.spaces import Layout, Segment


def getitem(a, node):
    """``out[i]``: an item of a tuple (``chunk``'s parts); ``x[...]``: indexing a channel tensor."""
    x = a.input_layout(node)
    return _item(a, node) if x is None else index(a, node, x)


def aten_slice(a, node):
    """``aten.slice(x, dim, start, end, step)``: ``x[:, a:b]`` in a graph captured by ``torch.export``."""
    x = a.input_layout(node)
    if x is None:
        return a.opaque_or_fresh(node)
    given = list(node.args[1:])
    dim, start, stop, step = given + [0, None, None, 1][len(given):]
    ndim = len(a.shape(node.args[0]) or ())
    return slice_channels(a, node, x, start, stop, step) if ndim >= 2 and dim % ndim == 1 else index_rest(a, node, x)


def _item(a, node):
    source = node.args[0]
    lay = a.layout.get(source) if isinstance(source, fx.Node) else None
    if isinstance(lay, tuple) and lay and not isinstance(lay[0], Segment):
        return lay[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(lay) else None
    if a.shape(node) is None:
        return None
    out = a.fresh_output(node, f"item of node '{source}'")
    kind = a.unknown_kind.get(source)
    if kind is not None and out:  # an item of an unknown op's tuple (chunk, split): that op's doing
        a.unknowns[kind][1].extend(seg.space for seg in out)
    return out


def index(a, node, x: Layout):
    """``x[...]`` of a channel tensor: slices only. One that keeps dim 1 whole passes the layout on (a
    crop, ``x[:, :, 1:]``); a slice of dim 1 is :func:`slice_channels`. Ints, ``None``, masks: unknown."""
    shape_in = a.shape(node.args[0])
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if shape_in is None or len(shape_in) < 2 or sum(e is Ellipsis for e in idx) > 1 or not all(
            isinstance(e, slice) or e is Ellipsis for e in idx):
        return a.unknown(node, f"indexing '{node.name}'", "indexing (other than slices)")
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (len(shape_in) - len(idx) + 1) + idx[at + 1:]
    channels = idx[1] if len(idx) > 1 else slice(None)
    return slice_channels(a, node, x, channels.start, channels.stop, channels.step)


def index_rest(a, node, x: Layout):
    """A slice along a dim other than channels: the layout goes on when the channel count does."""
    shape_in, shape_out = a.shape(node.args[0]), a.shape(node)
    if shape_in is None or shape_out is None or len(shape_out) < 2 or shape_out[1] != shape_in[1]:
        return a.unknown(node, f"slice '{node.name}'", "slice")
    return x


def slice_channels(a, node, x: Layout, start, stop, step):
    """``x[:, start:stop]``: the channels in between, each run its own space from then on (as in
    ``split``); what lies outside is computed and dropped (ghostnet keeps the first ``out_chs`` of a
    cat). A bound at or past an end follows a cut by itself (slices clamp); a bound inside must be
    rewritten by the cut: an int attribute of the module running the slice that equals it (dpn's
    ``x[:, :self.num_1x1_c]``) becomes the kept count of the channels before it. Bounds written as
    numbers in the code, negative or computed at run time, and steps: left whole, with a warning."""
    shape_in = a.shape(node.args[0])
    if any(isinstance(v, fx.Node) for v in (start, stop, step)) or step not in (None, 1):
        return a.unknown(node, f"channel slice '{node.name}' with a computed bound or a step",
                         "channel slice with a computed bound or a step")
    if shape_in is None or len(shape_in) < 2:
        return a.unknown(node, f"slice '{node.name}'", "slice")
    width = int(shape_in[1])
    begin, end = start or 0, width if stop is None else min(stop, width)
    if begin < 0 or end < 0:
        return a.unknown(node, f"channel slice '{node.name}' counted from the end",
                         "channel slice counted from the end")
    if begin == 0 and end == width:  # the whole axis, before and after any cut
        if stop is not None and stop == width and (attr := bound_attribute(a, node, stop)) is not None:
            a.size_attrs.append((*attr, [x]))  # keep the attribute describing the width
        return x
    bounds = [(v, raw) for v, raw in ((begin, start), (end, stop)) if 0 < v < width]
    attrs = [bound_attribute(a, node, raw) for _, raw in bounds]
    if None in attrs:
        return a.unknown(node, f"channel slice '{node.name}' with a bound fixed in the model's code",
                         "channel slice with a bound fixed in the model's code (keep it in an int "
                         "attribute of the module)")
    sizes = [s for s in (begin, end - begin, width - end) if s]
    pieces = a.cut_at(x, sizes)
    if pieces is None:
        return a.unknown(node, f"channel slice '{node.name}' across flattened or constrained channels",
                         "channel slice across flattened or constrained channels")
    ends = list(accumulate(sizes))
    for (v, _), attr in zip(bounds, attrs):  # the bound becomes the kept count of what lies before it
        a.size_attrs.append((*attr, [tuple(seg for piece in pieces[:ends.index(v) + 1] for seg in piece)]))
    return pieces[1] if begin else pieces[0]


def bound_attribute(a, node, value) -> tuple[str, str, str] | None:
    """``(module, attribute, "int")``: the one int attribute equal to a slice bound of the module that
    runs the slice. The same attribute may bound several slices (dpn slices two tensors at
    ``self.num_1x1_c``); ``analysis.check_shared_bounds`` checks they then all hold the same channels before it."""
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    module = a.modules.get(path)
    if module is None or type(value) is not int:
        return None
    matches = [k for k, v in vars(module).items() if not k.startswith("_") and type(v) is int and v == value]
    return (path, matches[0], "int") if len(matches) == 1 else None


def split(a, node):
    """``chunk`` / ``split`` / ``tensor_split``: along channels, each part becomes its own channel space.

    ``chunk(k)`` recomputes its parts from the channel count it is given, so it still splits in the
    right places after a cut as long as every part keeps the same number of channels: the parts are
    tied. ``split`` with sizes computed from the tensor's shape (fx nodes) behaves the same when the
    sizes are equal. Sizes the forward reads from its module (``torch.split(x, self.splits, 1)`` in
    timm's MixedConv2d, ``split((self.c, self.c), 1)`` in ultralytics' C2f) are rewritten by the cut:
    a list attribute equal to the sizes gets each part's kept count, an int attribute equal to every
    size gets the common count (the parts are then tied). Sizes written as numbers in the code, or
    matching no attribute (or several), cannot follow a cut: left whole, with a warning.
    """
    x = a.input_layout(node)
    what = node.target if node.op == "call_method" else node.target.__name__
    parts, shape_in = a.part_shapes(node), a.shape(node.args[0]) if node.args else None
    if x is None or parts is None or shape_in is None or len(shape_in) < 2:
        return a.unknown(node, f"'{what}' of a tensor without channels", what)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % len(shape_in) != 1:  # along batch or space: every part keeps all the channels
        return tuple(x for _ in parts)
    sizes = [int(p[1]) for p in parts]
    arg = node.args[1] if len(node.args) > 1 else next(iter(v for k, v in node.kwargs.items() if k != "dim"))
    recomputed = what == "chunk" or (what == "tensor_split" and isinstance(arg, int))  # k parts of any size
    fixed = not recomputed and not isinstance(arg, fx.Node) and not (
        isinstance(arg, (list, tuple)) and all(isinstance(v, fx.Node) for v in arg))
    attr = size_attribute(a, node, sizes) if fixed else None
    if fixed and attr is None:
        return a.unknown(node, f"'{what}' with sizes {sizes} fixed in the model's code",
                         f"'{what}' with sizes fixed in the model's code (use chunk(k), or keep the sizes "
                         "in one list attribute of the module)")
    if attr is not None and attr[2] == "list":  # each part its own space, its size rewritten
        pieces = a.cut_at(x, sizes)
        if pieces is None:
            return a.unknown(node, f"'{what}' across flattened or constrained channels",
                             f"'{what}' across flattened or constrained channels")
        a.size_attrs.append((*attr, pieces))
        return tuple(pieces)
    if len(set(sizes)) != 1:
        return a.unknown(node, f"'{what}' into unequal parts {sizes}", f"'{what}' into unequal parts")
    pieces = a.cut_at(x, sizes)
    if pieces is None:
        return a.unknown(node, f"'{what}' across flattened or constrained channels",
                         f"'{what}' across flattened or constrained channels")
    if any(len(p) != 1 for p in pieces):  # a part made of several spaces: equal sums, not expressible
        return a.unknown(node, f"'{what}' whose parts span several layers' channels",
                         f"'{what}' whose parts span several layers' channels")
    a.ties.append([(p[0].space, 1) for p in pieces])
    if attr is not None:  # an int attribute: every part keeps the same (tied) count
        a.size_attrs.append((*attr, pieces))
    return tuple(pieces)


def size_attribute(a, node, sizes: list[int]) -> tuple[str, str, str] | None:
    """``(module, attribute, kind)`` the split sizes come from, if exactly one attribute of the module
    running the split holds them: a list/tuple equal to ``sizes`` ("list"), else an int equal to every
    size ("int"). Found through the node's ``nn_module_stack`` (fx and export both record it)."""
    stack = node.meta.get("nn_module_stack")  # fx records none for the root's own ops
    path = list(stack.values())[-1][0] if stack else ""
    module = a.modules.get(path)
    if module is None:
        return None
    public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    matches = [(k, "list") for k, v in public.items() if isinstance(v, (list, tuple)) and len(v) == len(sizes)
               and all(type(i) is int for i in v) and list(v) == sizes]
    if not matches and len(set(sizes)) == 1:
        matches = [(k, "int") for k, v in public.items() if type(v) is int and v == sizes[0]]
    if len(matches) != 1 or any(rec[:2] == (path, matches[0][0]) for rec in a.size_attrs):
        return None  # none, ambiguous, or the same attribute splitting a second tensor
    return (path, *matches[0])
