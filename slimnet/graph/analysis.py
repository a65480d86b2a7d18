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
(``slimnet.capture``). fx graphs get their shapes from running on *meta* tensors (no compute, no
memory, the model's own tensors untouched); a forward the meta device cannot run falls back to one
real forward. Export graphs carry their shapes.

This module knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimnet._modes import preserved_modes

try:  # torchvision's FrozenBatchNorm2d keeps γ, β and the statistics as buffers (detection backbones)
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # torchvision is optional for the engine
    FrozenBatchNorm2d = None

# Norms whose per-channel entries we cut and whose |γ| ranks channels: BatchNorm*, SyncBatchNorm (both
# `_BatchNorm`) and FrozenBatchNorm2d (γ a buffer: the same per-channel affine, nothing trained).
NORM_TYPES: tuple[type, ...] = (_BatchNorm,) + ((FrozenBatchNorm2d,) if FrozenBatchNorm2d else ())


class TraceError(RuntimeError):
    """The model could not be captured by ``torch.fx``; the message ends with a hint."""


# ---------------------------------------------------------------------------------------------------
# Channel spaces and layouts


class _Space:
    """An atomic run of ``size`` channels; merged with others through a union-find ``parent``.

    ``blocks``: the run splits into this many equal blocks that must keep equal channel counts (set by
    grouped convs; 1 means no constraint). Only the root's values count.

    ``parts``: set when a ``chunk``/``split`` cut the run into consecutive sub-runs, each its own space
    from then on; layouts that name the whole run are read through :func:`_expand`.
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


def _expand(layout: Layout) -> Layout:
    """``layout`` with every space a chunk/split has cut replaced by its parts (same features, in order)."""
    if not any(seg.space.parts for seg in layout):
        return layout
    out = []
    for seg in layout:
        if seg.space.parts:
            out.extend(_expand(tuple(Segment(p, seg.mult) for p in seg.space.parts)))
        else:
            out.append(seg)
    return tuple(out)


def _layout_size(layout: Layout) -> int:
    return sum(seg.space.size * seg.mult for seg in layout)


# ---------------------------------------------------------------------------------------------------
# Results


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
        return _listing(_layer_names(self), 4)


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

    def group_of(self, module: str, kind: str = "out") -> ChannelGroup:
        """The group a module's axis belongs to (its first segment's group)."""
        gid = self.axes[(module, kind)][0][0]
        return self.groups[gid]


# ---------------------------------------------------------------------------------------------------
# Which ops do what to channels

# Modules that map each channel to itself (shape[1] in == shape[1] out).
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d,
)

# Modules whose output has the input's shape exactly (shape propagation skips running them).
_SAME_SHAPE_MODULES = NORM_TYPES + tuple(
    m for m in _CHANNELWISE_MODULES if not issubclass(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                                                          nn.modules.pooling._AdaptiveAvgPoolNd,
                                                          nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample,
                                                          nn.modules.padding._ConstantPadNd,
                                                          nn.modules.padding._ReflectionPadNd,
                                                          nn.modules.padding._ReplicationPadNd)))

# Functions and tensor methods that map each channel to itself, channel tensor first.
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pad,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip, torch.abs, torch.neg,
    torch.exp, torch.square, torch.sqrt, operator.neg, F.sigmoid, F.tanh,
}
try:  # EfficientNet's stochastic depth scales whole samples ((N, 1, 1, 1) noise in "row" mode, a scalar
    # in "batch" mode) and is the identity in eval: channel c stays channel c.
    from torchvision.ops import StochasticDepth, stochastic_depth

    _CHANNELWISE_FUNCTIONS.add(stochastic_depth)
    _CHANNELWISE_MODULES += (StochasticDepth,)
except ImportError:  # torchvision is optional for the engine
    pass
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clamp_max", "clip", "abs", "neg", "exp", "square", "sqrt", "contiguous", "clone",
    "float", "half", "double", "to", "type_as", "detach", "requires_grad_",
}

# Element-wise ops of two operands: channel i of the result needs channel i of each tensor operand.
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}

_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
# Ops that compute FLOPs FlopCounterMode counts, outside conv and linear modules (by name: torch functions,
# tensor methods and ATen ops alike): a graph holding one cannot have its FLOPs counted from layer shapes.
COMPUTE_OPS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "linear", "conv1d", "conv2d", "conv3d",
               "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention",
               "__matmul__", "addbmm", "addmv", "mv", "tensordot", "bilinear", "convolution"}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
_SPLIT_METHODS = {"chunk", "split", "tensor_split"}
_STACK_FUNCTIONS = {torch.stack}
_SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_ATEN_SLICE = torch.ops.aten.slice.Tensor  # export's x[:, a:b]: (x, dim, start, end, step)
# Reading a tensor's metadata does not depend on which channels it holds.
_METADATA_METHODS = {"size", "dim", "numel"}


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that also keeps any conv, linear or norm subclass as one leaf.

    Users subclass ``nn.Conv2d`` or ``_BatchNorm`` (or wrap them) outside ``torch.nn``; tracing into
    their ``forward`` would hide the layer we need to slice. ``leaf_modules`` lets a caller keep a
    module whose forward cannot be traced as a black box (its channels are then left whole).
    """

    def __init__(self, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear) + NORM_TYPES + self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, leaf_types: tuple[type, ...]) -> fx.Graph:
    """The forward as an ``fx.Graph`` whose module targets are ``model``'s own qualified names (run it
    with ``fx.Interpreter(model, graph=graph)``: no ``GraphModule``, no code generation)."""
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types; all mean "cannot capture this forward"
        where = ""
        for frame in reversed(err.__traceback__ and _frames(err.__traceback__) or []):
            if frame.startswith("forward of "):
                where = f" in {frame[len('forward of '):]}"
                break
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(err).__name__}: "
            f"{_first_line(err)}") from err
    return graph


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _capture(model: nn.Module, leaf_types: tuple[type, ...], example_inputs: tuple) -> tuple[fx.Graph, dict]:
    """The forward as a graph with module targets, and each node's shape: ``torch.fx`` symbolic tracing
    first (10-30 ms), ``torch.export`` when that fails (0.2-3 s; it specialises shape checks and unpacks
    ``*args``), a :class:`TraceError` naming both causes when neither can."""
    try:
        graph = _trace(model, leaf_types)
    except TraceError as fx_err:
        from slimnet.capture import export_graph  # only needed for forwards fx cannot read

        try:
            return export_graph(model, example_inputs, NORM_TYPES)
        except Exception as export_err:  # noqa: BLE001 - export raises many types; report its own words
            raise TraceError(
                f"cannot capture {type(model).__name__}'s forward. {fx_err} And torch.export failed: "
                f"{type(export_err).__name__}: {_first_line(export_err)}. Hint: pass the classes of the "
                "submodules these name in leaf_modules=[...] so they are kept whole (fx then traces around "
                "them), or rewrite data-dependent branches with torch.where."
            ) from export_err
    return graph, _shapes(model, graph, example_inputs)


def _frames(tb) -> list[str]:
    """Names of the ``forward`` methods on a traceback, innermost last (to name the failing module)."""
    out = []
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "forward":
            self_obj = tb.tb_frame.f_locals.get("self")
            if isinstance(self_obj, nn.Module):
                out.append(f"forward of {type(self_obj).__name__}")
        tb = tb.tb_next
    return out


# ---------------------------------------------------------------------------------------------------
# Model outputs

# Outputs a model returns for their spatial shape only, never read channel by channel, so a cut may narrow
# them: model class (``module.qualname``, matched along the MRO) -> keys in the output's structure. Add an
# entry for your own model the same way. ultralytics' Detect head returns ``{"boxes", "scores", "feats"}``
# in training (and ``(y, that dict)`` in eval); ``feats`` are the neck outputs it reads, returned so the loss
# can lay its anchor grid: ``v8DetectionLoss`` reads them only through ``make_anchors(feats)`` and
# ``feats[0].shape[2:]`` (ultralytics 8.4). Keeping them whole kept the Detect inputs whole.
SHAPE_ONLY_OUTPUTS: dict[str, tuple[str, ...]] = {"ultralytics.nn.tasks.DetectionModel": ("feats",)}


def shape_only_output_keys(model: nn.Module) -> frozenset:
    """The output keys of ``model`` that :data:`SHAPE_ONLY_OUTPUTS` declares read for their shape only."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(model).__mro__}
    return frozenset(k for name, keys in SHAPE_ONLY_OUTPUTS.items() if name in names for k in keys)


def _output_leaves(node: fx.Node) -> list[tuple[tuple, object]]:
    """``(key path, value)`` of every leaf the output node returns (export graphs carry the paths of
    their flat outputs in ``meta["output_paths"]``)."""
    paths = node.meta.get("output_paths")
    if paths is not None:
        return list(zip(paths, node.args[0]))
    return torch.utils._pytree.tree_flatten_with_path(node.args[0])[0]


def _path_key(entry) -> object:
    """The name of one step of a pytree key path: a dict key or an attribute (dataclass outputs)."""
    return getattr(entry, "key", getattr(entry, "name", None))


# ---------------------------------------------------------------------------------------------------
# The analysis


class _Analysis:
    """Walks an fx graph once, in topological order, assigning a channel layout to every tensor."""

    def __init__(self, model: nn.Module, graph: fx.Graph, shapes: dict[str, torch.Size | None]):
        self.graph = graph
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
            for seg in _expand(layout):
                seg.space.root().frozen_by.append(reason)
        elif isinstance(layout, (tuple, list)):
            for item in layout:
                self.freeze(item, reason)

    def union(self, a: Layout, b: Layout, reason: str) -> Layout:
        """Merge two layouts channel by channel; if their structures differ, freeze both.

        Layouts of the same width whose spaces end in different places (``cat(a, b) * gate``, the gate
        one conv's output) are first cut at every boundary of either, so both are the same runs.
        """
        a, b = _expand(a), _expand(b)
        if ([s.space.size for s in a] != [s.space.size for s in b] and _layout_size(a) == _layout_size(b)
                and all(seg.mult == 1 for seg in a + b)):
            ends = sorted({e for lay in (a, b) for e in itertools.accumulate(s.space.size for s in lay)})
            sizes = [e - s for s, e in zip([0, *ends[:-1]], ends)]
            if self.cut_at(a, sizes) is not None and self.cut_at(b, sizes) is not None:
                a, b = _expand(a), _expand(b)
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
        layout = _expand(layout)
        block = _layout_size(layout) // groups
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
                return _expand(lay)
        return None

    def stacked_layout(self, arg) -> Stacked | None:
        lay = self.layout.get(arg) if isinstance(arg, fx.Node) else None
        return Stacked(_expand(lay.layout), lay.dim) if isinstance(lay, Stacked) else None

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
        return _expand((Segment(self.module_out[module]),))

    # -- node handlers ------------------------------------------------------------------------------
    def run(self) -> None:
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

    def output(self, node) -> None:
        """The model's outputs keep their channels, except those read only for their shape
        (:data:`SHAPE_ONLY_OUTPUTS`): a tensor returned under such a key *and* elsewhere is kept whole."""
        frozen = [n for path, n in _output_leaves(node) if isinstance(n, fx.Node)
                  and not any(_path_key(k) in self.shape_only_keys for k in path)]
        self.freeze([self.layout.get(n) for n in frozen], "model output")

    def call_module(self, node):
        name, m = node.target, self.modules[node.target]
        self.calls[name] += 1
        if any(self.stacked_layout(a) for a in node.all_input_nodes):
            return self.unknown(node, f"{type(m).__name__} ('{name}') on stacked channels", "module on stacked channels")
        x = self.tensor_layout(node.args[0]) if node.args else None
        if x is None:
            what = f"{type(m).__name__} on an input without channels"
            return self.unknown(node, f"{type(m).__name__} ('{name}') on an input without channels", what)
        if isinstance(m, (_ConvNd, nn.Linear)) and (out_shape := self.shape(node)) is not None:
            # 2 x MACs per sample: each output feature reads (inputs / groups) x kernel weights
            fan_in = m.weight[0].numel()
            self.flops[name] += 2 * fan_in * math.prod(out_shape) // max(int(out_shape[0]), 1)
            channels = out_shape[-1] if isinstance(m, nn.Linear) else out_shape[1]
            if self.uses is not None:
                self.uses[name] += math.prod(out_shape) // max(int(out_shape[0]) * int(channels), 1)
        elif isinstance(m, (_ConvNd, nn.Linear)) or (
                not isinstance(m, NORM_TYPES) and any(True for _ in m.parameters(recurse=False))):
            self.uses = None  # an unknown shape, a transposed conv, or a black box with weights
        if isinstance(m, _ConvNd) and not m.transposed:
            if m.groups == 1:
                self.record(name, "in", x)
                return self.output_space(name, m.out_channels)
            if m.groups == m.in_channels == m.out_channels:  # depthwise: channel c filters channel c
                self.record(name, "dw", x)
                return x
            # Grouped: conv-group g reads input block g, writes output block g; keep `groups` and cut
            # every block to the same width (equal counts on each axis, chosen per block).
            reason = f"grouped conv '{name}' (groups={m.groups})"
            self.record(name, "in", x)
            self.grouped(x, m.groups, reason)
            out = self.output_space(name, m.out_channels)
            self.grouped(out, m.groups, reason)
            return out
        if isinstance(m, nn.Linear):
            if len(self.shape(node.args[0]) or ()) != 2:  # linear over the last dim of a >2-D tensor
                return self.unknown(node, f"Linear '{name}' on a tensor that is not (N, C)",
                                    "Linear on a tensor that is not (N, C)")
            self.record(name, "in", x)
            return self.output_space(name, m.out_features)
        if isinstance(m, NORM_TYPES):
            self.record(name, "bn", x)
            source = node.args[0]
            if (source.op == "call_module" and len(source.users) == 1
                    and isinstance(self.modules[source.target], (_ConvNd, nn.Linear))):
                self.norm_after.setdefault(source.target, []).append(name)
            return x
        if isinstance(m, _CHANNELWISE_MODULES):
            return self.channelwise(node, x)
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x, hard_coded=False)
        return self.unknown(node, f"{type(m).__name__} ('{name}')", type(m).__name__)

    def call_function(self, node):
        fn = node.target
        is_method = node.op == "call_method"
        if str(getattr(fn, "__name__", fn)).split(".")[0] in COMPUTE_OPS:
            self.uses = None  # FLOPs outside conv and linear layers: shapes of those alone do not count them
        x = self.tensor_layout(node.args[0]) if node.args else None
        if (is_method and fn in _METADATA_METHODS) or fn is getattr:
            return None  # x.size(), x.shape: metadata, not channel content
        if not is_method and fn in _STACK_FUNCTIONS:
            return self.stack(node)
        if (fn in _SOFTMAX_METHODS) if is_method else (fn in _SOFTMAX_FUNCTIONS):
            return self.softmax(node)
        if any(self.stacked_layout(a) for a in node.all_input_nodes):
            if (fn in _BINARY_METHODS) if is_method else (fn in _BINARY_FUNCTIONS):
                return self.binary_stacked(node)
            if (fn in _REDUCE_METHODS) if is_method else (fn in _REDUCE_FUNCTIONS):
                return self.reduce_stacked(node)
            name = fn if is_method else getattr(fn, "__name__", str(fn))
            what = f"'{name}' of channels moved off dim 1 by a stack or view (e.g. a channel shuffle)"
            return self.unknown(node, what, what)
        if fn is operator.getitem and x is None:
            return self.getitem(node)
        if fn is operator.getitem:
            return self.index(node, x)
        if fn is _ATEN_SLICE and x is not None:  # x[:, a:b] in a graph captured by torch.export
            given = list(node.args[1:])
            dim, start, stop, step = given + [0, None, None, 1][len(given):]
            ndim = len(self.shape(node.args[0]) or ())
            return self.slice_channels(node, x, start, stop, step) if ndim >= 2 and dim % ndim == 1 else (
                self.index_rest(node, x))
        if (fn in _CHANNELWISE_METHODS) if is_method else (fn in _CHANNELWISE_FUNCTIONS):
            if x is None:
                return self.fresh_output(node, None) if self.shape(node) is not None else None
            return self.channelwise(node, x)
        if (fn in _BINARY_METHODS) if is_method else (fn in _BINARY_FUNCTIONS):
            return self.binary(node)
        if not is_method and fn in _CAT_FUNCTIONS:
            return self.cat(node)
        if (fn in _SPLIT_METHODS) if is_method else (fn in _SPLIT_FUNCTIONS):
            return self.split(node, x)
        if (fn in _RESHAPE_METHODS) if is_method else (fn in _RESHAPE_FUNCTIONS):
            if x is None:
                return None
            hard_coded = fn in ("view", "reshape") or fn is torch.reshape
            return self.reshape(node, x, hard_coded=hard_coded)
        if (fn in _REDUCE_METHODS) if is_method else (fn in _REDUCE_FUNCTIONS):
            if x is None:
                return None
            return self.reduce(node, x)
        if not node.all_input_nodes or all(self.tensor_layout(a) is None for a in node.all_input_nodes):
            # Nothing channel-carrying goes in (shape arithmetic, constants): nothing to freeze.
            shape = self.shape(node)
            return self.new_space(int(shape[1]), f"tensor made at node '{node.name}'") if (
                shape is not None and len(shape) >= 2) else None
        return self.unknown(node, fn if is_method else getattr(fn, "__name__", str(fn)))

    def getitem(self, node):
        source = node.args[0]
        lay = self.layout.get(source) if isinstance(source, fx.Node) else None
        if isinstance(lay, tuple) and lay and not isinstance(lay[0], Segment):
            return lay[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(lay) else None
        if self.shape(node) is None:
            return None
        out = self.fresh_output(node, f"item of node '{source}'")
        kind = self.unknown_kind.get(source)
        if kind is not None and out:  # an item of an unknown op's tuple (chunk, split): that op's doing
            self.unknowns[kind][1].extend(seg.space for seg in out)
        return out

    def index(self, node, x: Layout):
        """``x[...]`` of a channel tensor: slices only. One that keeps dim 1 whole passes the layout on (a
        crop, ``x[:, :, 1:]``); a slice of dim 1 is :meth:`slice_channels`. Ints, ``None``, masks: unknown."""
        shape_in = self.shape(node.args[0])
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if shape_in is None or len(shape_in) < 2 or sum(e is Ellipsis for e in idx) > 1 or not all(
                isinstance(e, slice) or e is Ellipsis for e in idx):
            return self.unknown(node, f"indexing '{node.name}'", "indexing (other than slices)")
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (len(shape_in) - len(idx) + 1) + idx[at + 1:]
        channels = idx[1] if len(idx) > 1 else slice(None)
        return self.slice_channels(node, x, channels.start, channels.stop, channels.step)

    def index_rest(self, node, x: Layout):
        """A slice along a dim other than channels: the layout goes on when the channel count does."""
        shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
        if shape_in is None or shape_out is None or len(shape_out) < 2 or shape_out[1] != shape_in[1]:
            return self.unknown(node, f"slice '{node.name}'", "slice")
        return x

    def slice_channels(self, node, x: Layout, start, stop, step):
        """``x[:, start:stop]``: the channels in between, each run its own space from then on (as in
        ``split``); what lies outside is computed and dropped (ghostnet keeps the first ``out_chs`` of a
        cat). A bound at or past an end follows a cut by itself (slices clamp); a bound inside must be
        rewritten by the cut: an int attribute of the module running the slice that equals it (dpn's
        ``x[:, :self.num_1x1_c]``) becomes the kept count of the channels before it. Bounds written as
        numbers in the code, negative or computed at run time, and steps: left whole, with a warning."""
        shape_in = self.shape(node.args[0])
        if any(isinstance(v, fx.Node) for v in (start, stop, step)) or step not in (None, 1):
            return self.unknown(node, f"channel slice '{node.name}' with a computed bound or a step",
                                "channel slice with a computed bound or a step")
        if shape_in is None or len(shape_in) < 2:
            return self.unknown(node, f"slice '{node.name}'", "slice")
        width = int(shape_in[1])
        begin, end = start or 0, width if stop is None else min(stop, width)
        if begin < 0 or end < 0:
            return self.unknown(node, f"channel slice '{node.name}' counted from the end",
                                "channel slice counted from the end")
        if begin == 0 and end == width:  # the whole axis, before and after any cut
            if stop is not None and stop == width and (attr := self.bound_attribute(node, stop)) is not None:
                self.size_attrs.append((*attr, [x]))  # keep the attribute describing the width
            return x
        bounds = [(v, raw) for v, raw in ((begin, start), (end, stop)) if 0 < v < width]
        attrs = [self.bound_attribute(node, raw) for _, raw in bounds]
        if None in attrs:
            return self.unknown(node, f"channel slice '{node.name}' with a bound fixed in the model's code",
                                "channel slice with a bound fixed in the model's code (keep it in an int "
                                "attribute of the module)")
        sizes = [s for s in (begin, end - begin, width - end) if s]
        pieces = self.cut_at(x, sizes)
        if pieces is None:
            return self.unknown(node, f"channel slice '{node.name}' across flattened or constrained channels",
                                "channel slice across flattened or constrained channels")
        ends = list(itertools.accumulate(sizes))
        for (v, _), attr in zip(bounds, attrs):  # the bound becomes the kept count of what lies before it
            self.size_attrs.append((*attr, [tuple(seg for piece in pieces[:ends.index(v) + 1] for seg in piece)]))
        return pieces[1] if begin else pieces[0]

    def bound_attribute(self, node, value) -> tuple[str, str, str] | None:
        """``(module, attribute, "int")``: the one int attribute equal to a slice bound of the module that
        runs the slice. The same attribute may bound several slices (dpn slices two tensors at
        ``self.num_1x1_c``); :meth:`result` checks they then all hold the same channels before it."""
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        module = self.modules.get(path)
        if module is None or type(value) is not int:
            return None
        matches = [k for k, v in vars(module).items() if not k.startswith("_") and type(v) is int and v == value]
        return (path, matches[0], "int") if len(matches) == 1 else None

    def split(self, node, x: Layout | None):
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
        what = node.target if node.op == "call_method" else node.target.__name__
        parts, shape_in = self.part_shapes(node), self.shape(node.args[0]) if node.args else None
        if x is None or parts is None or shape_in is None or len(shape_in) < 2:
            return self.unknown(node, f"'{what}' of a tensor without channels", what)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim % len(shape_in) != 1:  # along batch or space: every part keeps all the channels
            return tuple(x for _ in parts)
        sizes = [int(p[1]) for p in parts]
        arg = node.args[1] if len(node.args) > 1 else next(iter(v for k, v in node.kwargs.items() if k != "dim"))
        recomputed = what == "chunk" or (what == "tensor_split" and isinstance(arg, int))  # k parts of any size
        fixed = not recomputed and not isinstance(arg, fx.Node) and not (
            isinstance(arg, (list, tuple)) and all(isinstance(a, fx.Node) for a in arg))
        attr = self.size_attribute(node, sizes) if fixed else None
        if fixed and attr is None:
            return self.unknown(node, f"'{what}' with sizes {sizes} fixed in the model's code",
                                f"'{what}' with sizes fixed in the model's code (use chunk(k), or keep the sizes "
                                "in one list attribute of the module)")
        if attr is not None and attr[2] == "list":  # each part its own space, its size rewritten
            pieces = self.cut_at(x, sizes)
            if pieces is None:
                return self.unknown(node, f"'{what}' across flattened or constrained channels",
                                    f"'{what}' across flattened or constrained channels")
            self.size_attrs.append((*attr, pieces))
            return tuple(pieces)
        if len(set(sizes)) != 1:
            return self.unknown(node, f"'{what}' into unequal parts {sizes}", f"'{what}' into unequal parts")
        pieces = self.cut_at(x, sizes)
        if pieces is None:
            return self.unknown(node, f"'{what}' across flattened or constrained channels",
                                f"'{what}' across flattened or constrained channels")
        if any(len(p) != 1 for p in pieces):  # a part made of several spaces: equal sums, not expressible
            return self.unknown(node, f"'{what}' whose parts span several layers' channels",
                                f"'{what}' whose parts span several layers' channels")
        self.ties.append([(p[0].space, 1) for p in pieces])
        if attr is not None:  # an int attribute: every part keeps the same (tied) count
            self.size_attrs.append((*attr, pieces))
        return tuple(pieces)

    def size_attribute(self, node, sizes: list[int]) -> tuple[str, str, str] | None:
        """``(module, attribute, kind)`` the split sizes come from, if exactly one attribute of the module
        running the split holds them: a list/tuple equal to ``sizes`` ("list"), else an int equal to every
        size ("int"). Found through the node's ``nn_module_stack`` (fx and export both record it)."""
        stack = node.meta.get("nn_module_stack")  # fx records none for the root's own ops
        path = list(stack.values())[-1][0] if stack else ""
        module = self.modules.get(path)
        if module is None:
            return None
        public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
        matches = [(k, "list") for k, v in public.items() if isinstance(v, (list, tuple)) and len(v) == len(sizes)
                   and all(type(i) is int for i in v) and list(v) == sizes]
        if not matches and len(set(sizes)) == 1:
            matches = [(k, "int") for k, v in public.items() if type(v) is int and v == sizes[0]]
        if len(matches) != 1 or any(a[:2] == (path, matches[0][0]) for a in self.size_attrs):
            return None  # none, ambiguous, or the same attribute splitting a second tensor
        return (path, *matches[0])

    def cut_at(self, layout: Layout, sizes: list[int]) -> list[Layout] | None:
        """``layout`` cut into consecutive runs of ``sizes`` channels, splitting spaces where a run ends
        inside one; None where a space cannot be split (flattened features, grouped-conv blocks, ties)."""
        bounds, total = [], 0
        for size in sizes[:-1]:
            total += size
            bounds.append(total)
        for bound in bounds:
            offset = 0
            for seg in _expand(layout):
                size = seg.space.size * seg.mult
                if offset < bound < offset + size:
                    if seg.mult != 1 or not self.split_space(seg.space, bound - offset):
                        return None
                    break
                offset += size
        pieces, current, offset, bounds = [], [], 0, bounds + [total + sizes[-1]]
        for seg in _expand(layout):
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

    def channelwise(self, node, x: Layout):
        shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
        if shape_in is None or shape_out is None or len(shape_out) < 2 or shape_out[1] != shape_in[1]:
            name = getattr(node.target, "__name__", node.target)
            return self.unknown(node, f"'{name}' changing the channel count")
        return x

    def binary(self, node):
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node) and self.shape(a) is not None]
        layouts = [self.tensor_layout(a) for a in tensors]
        out_shape = self.shape(node)
        channelled = []
        for arg, lay in zip(tensors, layouts):
            if out_shape is not None and self._broadcasts_over_channels(self.shape(arg), out_shape):
                continue  # a per-sample or scalar factor: any channel count works
            if lay is None:  # a constant indexed by channel (a buffer): we cannot slice it
                return self.unknown(node, f"{getattr(node.target, '__name__', node.target)} with a constant "
                                          "indexed by channel")
            channelled.append(lay)
        if not channelled:
            return self.fresh_output(node, None) if out_shape is not None and len(out_shape) >= 2 else None
        out = channelled[0]
        for lay in channelled[1:]:
            out = self.union(out, lay, f"operands of '{node.name}' with different channel layouts")
        return out

    @staticmethod
    def _broadcasts_over_channels(shape, out_shape) -> bool:
        """Whether an operand of ``shape`` is repeated along dim 1 of the ``out_shape`` result."""
        if len(out_shape) < 2 or out_shape[1] == 1:
            return False
        index = 1 - (len(out_shape) - len(shape))  # broadcasting aligns shapes from the right
        return index < 0 or shape[index] == 1

    def cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.tensor_layout(t) for t in tensors]
        ndim = len(self.shape(node) or ())
        if any(lay is None for lay in layouts) or ndim < 2:
            return self.unknown(node, "cat of tensors without channel layouts")
        if dim % ndim == 1:
            if any(seg.mult != 1 for lay in layouts for seg in lay):
                return self.unknown(node, "cat of flattened features")
            return tuple(seg for lay in layouts for seg in lay)
        out = layouts[0]  # cat along batch or space: every part keeps the same channels
        for lay in layouts[1:]:
            out = self.union(out, lay, f"cat '{node.name}' of different channel layouts")
        return out

    def reshape(self, node, x: Layout, hard_coded: bool):
        """Reshapes that keep dim 0 and either keep dim 1 (squeeze) or flatten everything into it, or
        unstack: ``(N, P*C, ...) -> (N, P, C, ...)`` with ``C`` computed, see :meth:`unstack`."""
        shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
        if shape_in is None or shape_out is None or len(shape_in) < 2 or len(shape_out) < 2:
            return self.unknown(node, f"reshape '{node.name}'", "reshape")
        if (len(shape_out) == len(shape_in) + 1 and shape_out[0] == shape_in[0] and shape_out[3:] == shape_in[2:]
                and shape_out[1] * shape_out[2] == shape_in[1] and shape_out[1] > 1):
            return self.unstack(node, x, int(shape_out[1]))
        if hard_coded and not self._dim1_is_dynamic(node):
            return self.unknown(node, f"reshape '{node.name}' with a hard-coded channel count",
                                "reshape with a hard-coded channel count (e.g. a channel shuffle)")
        rest = math.prod(shape_in[2:])
        if shape_out[0] == shape_in[0] and shape_out[1] == shape_in[1] and math.prod(shape_out[2:]) == rest:
            return x  # e.g. (N, C, 1, 1) -> (N, C): channel-major memory keeps channel c at c
        if len(shape_out) == 2 and shape_out[0] == shape_in[0] and shape_out[1] == shape_in[1] * rest:
            return tuple(Segment(seg.space, seg.mult * rest) for seg in x)  # c -> [c*rest, (c+1)*rest)
        return self.unknown(node, f"reshape '{node.name}' {tuple(shape_in)} -> {tuple(shape_out)}", "reshape")

    @staticmethod
    def _dim1_is_dynamic(node) -> bool:
        """``x.view(n, -1)`` follows the channel count after a cut; ``x.view(n, 512)`` does not."""
        shape_args = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = shape_args[0]
        if len(shape_args) < 2:
            return False
        return shape_args[1] == -1 or isinstance(shape_args[1], fx.Node)

    # -- stacked channels (skresnet's selective kernel) ------------------------------------------------
    def stack(self, node):
        """``torch.stack(tensors, dim)``: every tensor keeps the same channels (merged); stacking at dim 0 or
        1 moves them to dim 2, further in leaves them at dim 1."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.tensor_layout(t) for t in tensors]
        ndim = len(self.shape(node) or ())
        if any(lay is None for lay in layouts) or ndim < 3:
            return self.unknown(node, "stack of tensors without channel layouts", "stack")
        out = layouts[0]
        for lay in layouts[1:]:
            out = self.union(out, lay, f"stack '{node.name}' of different channel layouts")
        return Stacked(out, 2) if dim % ndim in (0, 1) else out

    def unstack(self, node, x: Layout, paths: int):
        """``view(N, P, C // P, ...)`` of a conv's ``P*C`` outputs (skresnet's attention, one block of
        filters per path): the ``P`` blocks become one space (kept alike) with channels at dim 2. The
        per-path width must be computed in the forward (an fx node or -1), so it follows a cut."""
        shape_args = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = shape_args[0]
        if len(shape_args) < 3 or not (shape_args[2] == -1 or isinstance(shape_args[2], fx.Node)):
            return self.unknown(node, f"reshape '{node.name}' with a hard-coded channel count",
                                "reshape with a hard-coded channel count (e.g. a channel shuffle)")
        width = _layout_size(x) // paths
        pieces = self.cut_at(x, [width] * paths)
        if pieces is None:
            return self.unknown(node, f"reshape '{node.name}' across flattened or constrained channels",
                                "reshape across flattened or constrained channels")
        out = pieces[0]
        for piece in pieces[1:]:
            out = self.union(out, piece, f"blocks of '{node.name}' with different channel layouts")
        return Stacked(out, 2)

    def softmax(self, node):
        """Softmax over any dim but the channels' keeps channel ``c`` at ``c``."""
        arg = node.args[0]
        lay = self.tensor_layout(arg) or self.stacked_layout(arg)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        ndim = len(self.shape(arg) or ())
        channel_dim = lay.dim if isinstance(lay, Stacked) else 1
        if lay is None or dim is None or ndim < 2 or dim % ndim == channel_dim:
            return self.unknown(node, f"softmax '{node.name}' over channels", "softmax over channels")
        return lay

    def binary_stacked(self, node):
        """Element-wise ops between stacked tensors (or with factors repeated along their channel dim)."""
        out_shape = self.shape(node)
        stacked = []
        for arg in node.args[:2]:
            if not isinstance(arg, fx.Node) or self.shape(arg) is None:
                continue  # a Python number
            lay = self.stacked_layout(arg)
            if lay is None and out_shape is not None:
                shape, index = self.shape(arg), None
                index = None if shape is None else len(shape) - (len(out_shape) - 2)
                if index is not None and (index < 0 or shape[index] == 1) and out_shape[2] != 1:
                    continue  # repeated along the channel dim
            if lay is None or lay.dim != 2 or out_shape is None or len(out_shape) != len(self.shape(arg)):
                return self.unknown(node, f"'{node.name}' mixing stacked and other channels",
                                    "element-wise op mixing stacked and other channels")
            stacked.append(lay.layout)
        if not stacked:
            return self.unknown(node, f"'{node.name}' on stacked channels", "element-wise op on stacked channels")
        out = stacked[0]
        for lay in stacked[1:]:
            out = self.union(out, lay, f"operands of '{node.name}' with different channel layouts")
        return Stacked(out, 2)

    def reduce_stacked(self, node):
        """``sum``/``mean`` over dims other than the channels': back to channels at dim 1 once the dims
        before them are reduced away (``torch.sum(x, dim=1)`` after the selective kernel's weighting)."""
        lay = self.stacked_layout(node.args[0])
        shape_in = self.shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or shape_in is None or lay is None:
            return self.unknown(node, f"reduction '{node.name}' over stacked channels", "reduction over stacked channels")
        dims = {d % len(shape_in) for d in ([dims] if isinstance(dims, int) else dims)}
        if lay.dim in dims or 0 in dims:
            return self.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
        channel_dim = lay.dim if keepdim else lay.dim - sum(d < lay.dim for d in dims)
        return lay.layout if channel_dim == 1 else Stacked(lay.layout, channel_dim)

    def reduce(self, node, x: Layout):
        shape_in, shape_out = self.shape(node.args[0]), self.shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or shape_in is None or shape_out is None or len(shape_out) < 2:
            return self.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d % len(shape_in) in (0, 1) for d in dims) or shape_out[1] != shape_in[1]:
            return self.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
        return x

    # -- results ------------------------------------------------------------------------------------
    def check_shared_bounds(self) -> None:
        """One attribute bounding several slices (or parts) must come out of the cut with one value: every
        record of it must count the same groups, else all of them are left whole."""
        by_attr: dict[tuple[str, str], list[list[Layout]]] = {}
        for module, attr, _, pieces in self.size_attrs:
            by_attr.setdefault((module, attr), []).append(pieces)
        for (module, attr), records in by_attr.items():
            counted = {tuple(tuple(sorted(seg.space.root().id for seg in _expand(piece))) for piece in pieces)
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
            for seg in _expand(layout):
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
            live_spaces = [seg.space for s in spaces for seg in _expand((Segment(s),))]  # split ones: their parts
            touched = [g for g in {roots[s.root().id].id: roots[s.root().id] for s in live_spaces}.values()
                       if g.refs and g.id not in frozen_with_norm
                       and not any(r in ("model input", "model output") for r in g.frozen_by)]
            if not touched:
                continue
            kept = sorted({name for g in touched for name in _layer_names(g)})
            warnings.append(f"unknown op {kind} at {_listing(nodes, 3, quote=True)}: its channels are kept whole"
                            + (f" in {_listing(kept, 4)}" if kept else ""))
        norm_after = {layer: norms[0] for layer, norms in self.norm_after.items()
                      if len(norms) == 1 and self.calls[layer] == 1 and self.calls[norms[0]] == 1}
        size_attrs = [(module, attr, kind, [[roots[seg.space.root().id].id for seg in _expand(piece)]
                                            for piece in pieces])
                      for module, attr, kind, pieces in self.size_attrs]
        return ChannelGraph(groups=groups, axes=axes, warnings=warnings, norm_after=norm_after, ties=ties,
                            flops=dict(self.flops), size_attrs=size_attrs,
                            uses=dict(self.uses) if self.uses is not None else None)

    def _tied_groups(self, roots: dict[int, ChannelGroup], groups: list[ChannelGroup]) -> list:
        """Ties as group ids; a group tied to one that is left whole is left whole too (it cannot shrink
        alone), and a tie a group enters twice with different block counts freezes all its groups."""
        ties = []
        for tie in self.ties:
            members: dict[int, int] = {}
            for space, k in tie:
                for part in _expand((Segment(space),)):  # a tied space split later: should not happen
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


def _layer_names(group: ChannelGroup) -> list[str]:
    return group.producers or sorted({r.module for r in group.refs})


def _listing(names: list[str], limit: int, quote: bool = False) -> str:
    shown = [f"'{n}'" if quote else n for n in names[:limit]]
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ("node " if quote and len(names) == 1 else "nodes " if quote else "") + ", ".join(shown) + more


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph, recording every node's output shape.

    With ``meta=True`` the inputs are meta tensors and nothing is computed: convs and linears get
    their output shape by formula, shape-preserving leaves (BatchNorm, activations) pass their input
    through, other leaves run on meta copies of their own tensors (``functional_call``, which puts
    the originals back), and tensors read by ``get_attr`` are meta copies. So the model's tensors,
    BN statistics, counters and the RNG are never touched.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, meta: bool):
        super().__init__(model, graph=graph)
        self.meta = meta
        self.shapes: dict[str, torch.Size | None] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out):
            self.shapes[n.name] = tuple(t.shape for t in out)  # chunk, split: one shape per part
        else:
            self.shapes[n.name] = out.shape if isinstance(out, torch.Tensor) else None
        return out

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if self.meta and isinstance(value, torch.Tensor) else value

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and isinstance(m, _SAME_SHAPE_MODULES):
            return x  # its output has its input's shape; no need to run it (real or meta)
        if not self.meta:
            return super().call_module(target, args, kwargs)
        if isinstance(x, torch.Tensor) and (shape := _leaf_output_shape(m, x.shape)) is not None:
            return x.new_empty(shape)
        tensors = dict(m.named_parameters(remove_duplicate=False))
        tensors.update(m.named_buffers(remove_duplicate=False))
        if not tensors:
            return super().call_module(target, args, kwargs)
        state = {k: v.to("meta") for k, v in tensors.items()}
        return torch.func.functional_call(m, state, tuple(args), kwargs, tie_weights=True, strict=False)


def _leaf_output_shape(m: nn.Module, shape: torch.Size) -> tuple | None:
    """A conv's or linear's output shape on a (batched) input of ``shape``; None for anything else."""
    if isinstance(m, nn.Linear) and len(shape) >= 1:
        if shape[-1] != m.in_features:
            raise ValueError(f"Linear with {m.in_features} inputs got a tensor of shape {tuple(shape)}")
        return (*shape[:-1], m.out_features)
    if not isinstance(m, _ConvNd) or m.transposed or len(shape) != len(m.kernel_size) + 2:
        return None
    if shape[1] != m.in_channels:
        raise ValueError(f"conv with {m.in_channels} input channels got a tensor of shape {tuple(shape)}")
    if isinstance(m.padding, str):  # "valid": none; "same": output size = input size (stride 1 only)
        return (shape[0], m.out_channels, *shape[2:]) if m.padding == "same" else (
            shape[0], m.out_channels,
            *[(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(shape[2:], m.kernel_size, m.stride, m.dilation)])
    return (shape[0], m.out_channels, *[
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(shape[2:], m.kernel_size, m.stride, m.padding, m.dilation)])


def _meta_shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple) -> dict[str, torch.Size | None]:
    """Shapes from a forward on the meta device: no compute, the model untouched. 5-40 ms on
    torchvision models at 224 px, against 0.2-3 s for a real train-mode forward on two busy cores."""
    recorder = _ShapeRecorder(model, graph, meta=True)
    with torch.no_grad():
        recorder.run(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs))
    return recorder.shapes


def _real_shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple) -> dict[str, torch.Size | None]:
    """Run the traced model once for real, recording each node's output shape.

    Runs in train mode (the traced graph is the train-mode one, with auxiliary heads), then puts every
    buffer back (BatchNorm and InstanceNorm running statistics, counters), so tracing never changes
    the model.
    """
    saved = {name: buf.clone() for name, buf in model.named_buffers()}
    recorder = _ShapeRecorder(model, graph, meta=False)
    try:
        with torch.no_grad():
            recorder.run(*example_inputs)
    finally:
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved.items():
                buffers[name].copy_(value)
    return recorder.shapes


def _shapes(model: nn.Module, graph: fx.Graph, example_inputs: tuple) -> dict[str, torch.Size | None]:
    """Each node's output shape: on meta tensors when the forward allows, else from a real forward
    (a forward that makes CPU tensors of its own, or reads values with ``.item()``, needs real data)."""
    try:
        return _meta_shapes(model, graph, example_inputs)
    except Exception:  # noqa: BLE001 - any failure on meta means "needs real data", never a wrong shape
        return _real_shapes(model, graph, example_inputs)


def _as_batch_of_two(example_inputs) -> tuple:
    """Train-mode BatchNorm needs more than one value per channel, so trace with a batch of two."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            x = x[:2] if x.shape[0] >= 2 else torch.cat([x, x], 0)
        out.append(x)
    return tuple(out)


def trace_channel_groups(model: nn.Module, example_inputs, leaf_modules=()) -> ChannelGraph:
    """Trace ``model`` (``torch.fx``, else ``torch.export``) and return its channel groups.

    Args:
        model: any ``nn.Module`` whose forward ``torch.fx`` or ``torch.export`` can capture.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes matter, values do not).
        leaf_modules: module classes to keep as black boxes (their channels are left whole).

    Raises:
        TraceError: neither way can capture the forward; the message names both causes and what to do.
    """
    with preserved_modes(model):
        model.train()  # the train-mode graph includes auxiliary heads that also consume channels
        graph, shapes = _capture(model, tuple(leaf_modules), _as_batch_of_two(example_inputs))
    analysis = _Analysis(model, graph, shapes)
    analysis.run()
    return analysis.result()
