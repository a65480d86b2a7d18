"""Trace a model into channel groups: the layers that share one channel axis and must be cut together.

A *channel space* is one run of channels born in one place: the output filters of a conv or linear
layer, or a model input. Ops that keep channels one-to-one (BatchNorm, activations, pooling, depthwise
convs) pass a space through; element-wise ops with two tensor operands (a residual ``add``, a
squeeze-excite ``mul``) merge the spaces of their operands, since the sum is only defined when both
sides keep the same channels; ``cat`` along channels lays spaces side by side; ``flatten`` turns each
channel into a block of ``H*W`` features. Merged spaces form a :class:`ChannelGroup`.

Every parameter axis indexed by channels (a conv's filters or inputs, a BN's entries, a linear's
inputs) is recorded as a :class:`Layout`: the spaces it sees, in order, with the offset and block size
of each. Cutting a group then means slicing each recorded axis at the right offsets, which is what
``surgery`` does.

A grouped conv (``groups=G``, not depthwise) reads input block ``g`` and writes output block ``g`` only:
its input and output axes each split into ``G`` equal blocks. We keep ``groups`` unchanged and require
every block to keep the *same number* of channels (which ones may differ per block), recorded as the
space's ``blocks``; ``plan`` honours it by rounding the kept count per block up, ``surgery`` slices the
weight's input dimension block by block. When the conv reads a concatenation, its parts are *tied*:
each keeps the same count per block (``ChannelGraph.ties``, honoured by ``plan``).

``chunk`` / ``split`` along channels cut a space into parts, each its own space from then on (the
space's ``parts``). ``chunk(k)`` ties its parts to equal counts (it re-splits whatever width it gets);
sizes the forward reads from a module attribute (``self.splits``, ``self.c``) are rewritten by the cut
(``ChannelGraph.size_attrs`` -> ``PrunePlan.attrs``). A sum or product of layouts that end in different
places (``cat(a, b) * gate``) cuts both at every boundary before merging.

Anything whose channel semantics are unknown (an op we do not model, a grouped conv fed by unevenly
aligned parts, a hard-coded reshape or channel shuffle, split sizes written in the code, the model's
inputs and outputs) *freezes* the spaces it touches: frozen groups are left whole, with the reason
recorded; every frozen group holding a norm gets one warning naming its layers and the reason (other
unknown ops one warning per kind), so a model is never cut somewhere we do not understand, silently.

The forward is captured by ``torch.fx`` symbolic tracing, or by ``torch.export`` when that fails
(``slimnet.graph.capture``). fx graphs get their shapes from running on *meta* tensors (no compute, no
memory, the model's own tensors untouched); a forward the meta device cannot run falls back to one
real forward. Export graphs carry their shapes.

The package, one idea a file, read in this order:

- ``spaces``: channel spaces (union-find), segments and layouts, stacked layouts;
- ``groups``: what comes out: :class:`AxisRef`, :class:`ChannelGroup`, :class:`ChannelGraph`;
- ``tracing`` and ``shapes``: capturing the forward and every node's shape;
- ``registry``: the op table, and how to register a handler for an op of your own (:data:`OPS`);
- ``ops``: the built-in handlers (element-wise, cat, reshape, reductions, conv, linear, norms), and the
  default table; ``slicing`` (chunk, split, ``x[:, a:b]``) and ``stacking`` (``torch.stack``) the rest;
- ``outputs``: which model outputs keep their channels (:data:`SHAPE_ONLY_OUTPUTS`);
- ``analysis``: the walk over the graph and :func:`trace_channel_groups`.

This package knows nothing of Lightning or Hydra.
"""

from slimnet.graph.analysis import trace_channel_groups
from slimnet.graph.groups import AxisRef, ChannelGraph, ChannelGroup
from slimnet.graph.ops import COMPUTE_OPS, NORM_TYPES, OPS, channelwise, elementwise, opaque
from slimnet.graph.outputs import SHAPE_ONLY_OUTPUTS
from slimnet.graph.registry import OpTable, reads_stacked
from slimnet.graph.shapes import meta_shapes  # noqa: F401 - measure.py shares the shape pass
from slimnet.graph.spaces import Layout, Segment, Stacked
from slimnet.graph.tracing import TraceError, as_batch_of_two, symbolic_graph  # noqa: F401 - and the tracer

__all__ = [
    "COMPUTE_OPS", "NORM_TYPES", "OPS", "SHAPE_ONLY_OUTPUTS", "AxisRef", "ChannelGraph", "ChannelGroup", "Layout",
    "OpTable", "Segment", "Stacked", "TraceError", "channelwise", "elementwise", "opaque", "reads_stacked",
    "trace_channel_groups",
]
