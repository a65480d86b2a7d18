"""Stacked channels: ``torch.stack(paths, 1)`` moves channels to dim 2 (skresnet's selective kernel).

Such a tensor's layout is a :class:`spaces.Stacked`; only handlers marked ``reads_stacked`` see it
(element-wise ops, softmax, reductions over other dims, stack); any other op on it is unknown.
"""

from __future__ import annotations

from torch import fx

from slimnet.graph.registry import reads_stacked
from slimnet.graph.spaces import Layout, Stacked, layout_size


@reads_stacked
def stack(a, node):
    """``torch.stack(tensors, dim)``: every tensor keeps the same channels (merged); stacking at dim 0 or
    1 moves them to dim 2, further in leaves them at dim 1."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    layouts = [a.tensor_layout(t) for t in tensors]
    ndim = len(a.shape(node) or ())
    if any(lay is None for lay in layouts) or ndim < 3:
        return a.unknown(node, "stack of tensors without channel layouts", "stack")
    out = layouts[0]
    for lay in layouts[1:]:
        out = a.union(out, lay, f"stack '{node.name}' of different channel layouts")
    return Stacked(out, 2) if dim % ndim in (0, 1) else out


def unstack(a, node, x: Layout, paths: int):
    """``view(N, P, C // P, ...)`` of a conv's ``P*C`` outputs (skresnet's attention, one block of
    filters per path): the ``P`` blocks become one space (kept alike) with channels at dim 2. The
    per-path width must be computed in the forward (an fx node or -1), so it follows a cut."""
    shape_args = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = shape_args[0]
    if len(shape_args) < 3 or not (shape_args[2] == -1 or isinstance(shape_args[2], fx.Node)):
        return a.unknown(node, f"reshape '{node.name}' with a hard-coded channel count",
                         "reshape with a hard-coded channel count (e.g. a channel shuffle)")
    width = layout_size(x) // paths
    pieces = a.cut_at(x, [width] * paths)
    if pieces is None:
        return a.unknown(node, f"reshape '{node.name}' across flattened or constrained channels",
                         "reshape across flattened or constrained channels")
    out = pieces[0]
    for piece in pieces[1:]:
        out = a.union(out, piece, f"blocks of '{node.name}' with different channel layouts")
    return Stacked(out, 2)


@reads_stacked
def softmax(a, node):
    """Softmax over any dim but the channels' keeps channel ``c`` at ``c``."""
    arg = node.args[0]
    lay = a.tensor_layout(arg) or a.stacked_layout(arg)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    ndim = len(a.shape(arg) or ())
    channel_dim = lay.dim if isinstance(lay, Stacked) else 1
    if lay is None or dim is None or ndim < 2 or dim % ndim == channel_dim:
        return a.unknown(node, f"softmax '{node.name}' over channels", "softmax over channels")
    return lay


def binary_stacked(a, node):
    """Element-wise ops between stacked tensors (or with factors repeated along their channel dim)."""
    out_shape = a.shape(node)
    stacked = []
    for arg in node.args[:2]:
        if not isinstance(arg, fx.Node) or a.shape(arg) is None:
            continue  # a Python number
        lay = a.stacked_layout(arg)
        if lay is None and out_shape is not None:
            shape, index = a.shape(arg), None
            index = None if shape is None else len(shape) - (len(out_shape) - 2)
            if index is not None and (index < 0 or shape[index] == 1) and out_shape[2] != 1:
                continue  # repeated along the channel dim
        if lay is None or lay.dim != 2 or out_shape is None or len(out_shape) != len(a.shape(arg)):
            return a.unknown(node, f"'{node.name}' mixing stacked and other channels",
                             "element-wise op mixing stacked and other channels")
        stacked.append(lay.layout)
    if not stacked:
        return a.unknown(node, f"'{node.name}' on stacked channels", "element-wise op on stacked channels")
    out = stacked[0]
    for lay in stacked[1:]:
        out = a.union(out, lay, f"operands of '{node.name}' with different channel layouts")
    return Stacked(out, 2)


def reduce_stacked(a, node):
    """``sum``/``mean`` over dims other than the channels': back to channels at dim 1 once the dims
    before them are reduced away (``torch.sum(x, dim=1)`` after the selective kernel's weighting)."""
    lay = a.stacked_layout(node.args[0])
    shape_in = a.shape(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or shape_in is None or lay is None:
        return a.unknown(node, f"reduction '{node.name}' over stacked channels", "reduction over stacked channels")
    dims = {d % len(shape_in) for d in ([dims] if isinstance(dims, int) else dims)}
    if lay.dim in dims or 0 in dims:
        return a.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
    channel_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
    return lay.layout if channel_dim == 1 else Stacked(lay.layout, channel_dim)
