"""Which ops do what to channels: the built-in handlers and the default op table, :data:`OPS`.

Ops that keep channels one-to-one (BatchNorm, activations, pooling, depthwise convs) pass a layout
through; element-wise ops of two tensors (a residual ``add``, a squeeze-excite ``mul``) merge their
operands' layouts; ``cat`` along channels lays layouts side by side; ``flatten`` turns each channel into
a block of ``H*W`` features; a conv or linear layer starts a new space. Splits and slices live in
``slicing``, stacks in ``stacking``; ``registry`` says how to add a handler of your own.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from slimnet.graph.registry import OpTable, reads_stacked
from slimnet.graph.slicing import aten_slice, getitem, split
from slimnet.graph.spaces import Layout, Segment
from slimnet.graph.stacking import binary_stacked, reduce_stacked, softmax, stack, unstack

try:  # torchvision's FrozenBatchNorm2d keeps γ, β and the statistics as buffers (detection backbones)
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # torchvision is optional for the engine
    FrozenBatchNorm2d = None

# Norms whose per-channel entries we cut and whose |γ| ranks channels: BatchNorm*, SyncBatchNorm (both
# `_BatchNorm`) and FrozenBatchNorm2d (γ a buffer: the same per-channel affine, nothing trained).
NORM_TYPES: tuple[type, ...] = (_BatchNorm,) + ((FrozenBatchNorm2d,) if FrozenBatchNorm2d else ())


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
SAME_SHAPE_MODULES = NORM_TYPES + tuple(
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
# Reading a tensor's metadata does not depend on which channels it holds.
_METADATA_METHODS = {"size", "dim", "numel"}


# ---------------------------------------------------------------------------------------------------
# Handlers: (analysis, node) -> the output's layout


@reads_stacked
def metadata(a, node):
    """``x.size()``, ``x.shape``: metadata, not channel content."""


def channelwise(a, node):
    """Channel ``c`` in, channel ``c`` out (activations, pooling, dropout): the layout passes through."""
    x = a.input_layout(node)
    if x is None:  # no channel tensor goes in (a constant): a fresh space if the result has channels
        return a.fresh_output(node, None) if a.shape(node) is not None else None
    shape_in, shape_out = a.shape(node.args[0]), a.shape(node)
    if shape_in is None or shape_out is None or len(shape_out) < 2 or shape_out[1] != shape_in[1]:
        name = getattr(node.target, "__name__", node.target)
        return a.unknown(node, f"'{name}' changing the channel count")
    return x


@reads_stacked
def elementwise(a, node):
    """An element-wise op of two operands: channel ``i`` of the result needs channel ``i`` of each tensor
    operand, so their layouts merge (operands repeated along channels, per-sample factors, scalars aside)."""
    if any(a.stacked_layout(arg) for arg in node.all_input_nodes):
        return binary_stacked(a, node)
    tensors = [arg for arg in node.args[:2] if isinstance(arg, fx.Node) and a.shape(arg) is not None]
    layouts = [a.tensor_layout(arg) for arg in tensors]
    out_shape = a.shape(node)
    channelled = []
    for arg, lay in zip(tensors, layouts):
        if out_shape is not None and _broadcasts_over_channels(a.shape(arg), out_shape):
            continue  # a per-sample or scalar factor: any channel count works
        if lay is None:  # a constant indexed by channel (a buffer): we cannot slice it
            return a.unknown(node, f"{getattr(node.target, '__name__', node.target)} with a constant "
                             "indexed by channel")
        channelled.append(lay)
    if not channelled:
        return a.fresh_output(node, None) if out_shape is not None and len(out_shape) >= 2 else None
    out = channelled[0]
    for lay in channelled[1:]:
        out = a.union(out, lay, f"operands of '{node.name}' with different channel layouts")
    return out


def opaque(a, node):
    """An op known to mix channels: what it touches is left whole (as for an unknown op)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return a.unknown(node, f"'{name}'", f"'{name}'")


def _broadcasts_over_channels(shape, out_shape) -> bool:
    """Whether an operand of ``shape`` is repeated along dim 1 of the ``out_shape`` result."""
    if len(out_shape) < 2 or out_shape[1] == 1:
        return False
    index = 1 - (len(out_shape) - len(shape))  # broadcasting aligns shapes from the right
    return index < 0 or shape[index] == 1


def cat(a, node):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    layouts = [a.tensor_layout(t) for t in tensors]
    ndim = len(a.shape(node) or ())
    if any(lay is None for lay in layouts) or ndim < 2:
        return a.unknown(node, "cat of tensors without channel layouts")
    if dim % ndim == 1:
        if any(seg.mult != 1 for lay in layouts for seg in lay):
            return a.unknown(node, "cat of flattened features")
        return tuple(seg for lay in layouts for seg in lay)
    out = layouts[0]  # cat along batch or space: every part keeps the same channels
    for lay in layouts[1:]:
        out = a.union(out, lay, f"cat '{node.name}' of different channel layouts")
    return out


def reshape(a, node):
    """``flatten``, ``view``, ``reshape``, ``squeeze``, ``unsqueeze``: see :func:`_reshape`; ``view`` and
    ``reshape`` take their sizes from the code, so a channel count written there is refused."""
    x = a.input_layout(node)
    if x is None:
        return None
    fn = node.target
    return _reshape(a, node, x, hard_coded=fn in ("view", "reshape") or fn is torch.reshape)


def flatten_module(a, node):
    """``nn.Flatten``: its sizes come from the input's shape."""
    return _reshape(a, node, a.input_layout(node), hard_coded=False)


def _reshape(a, node, x: Layout, hard_coded: bool):
    """Reshapes that keep dim 0 and either keep dim 1 (squeeze) or flatten everything into it, or
    unstack: ``(N, P*C, ...) -> (N, P, C, ...)`` with ``C`` computed, see :func:`stacking.unstack`."""
    shape_in, shape_out = a.shape(node.args[0]), a.shape(node)
    if shape_in is None or shape_out is None or len(shape_in) < 2 or len(shape_out) < 2:
        return a.unknown(node, f"reshape '{node.name}'", "reshape")
    if (len(shape_out) == len(shape_in) + 1 and shape_out[0] == shape_in[0] and shape_out[3:] == shape_in[2:]
            and shape_out[1] * shape_out[2] == shape_in[1] and shape_out[1] > 1):
        return unstack(a, node, x, int(shape_out[1]))
    if hard_coded and not _dim1_is_dynamic(node):
        return a.unknown(node, f"reshape '{node.name}' with a hard-coded channel count",
                         "reshape with a hard-coded channel count (e.g. a channel shuffle)")
    rest = math.prod(shape_in[2:])
    if shape_out[0] == shape_in[0] and shape_out[1] == shape_in[1] and math.prod(shape_out[2:]) == rest:
        return x  # e.g. (N, C, 1, 1) -> (N, C): channel-major memory keeps channel c at c
    if len(shape_out) == 2 and shape_out[0] == shape_in[0] and shape_out[1] == shape_in[1] * rest:
        return tuple(Segment(seg.space, seg.mult * rest) for seg in x)  # c -> [c*rest, (c+1)*rest)
    return a.unknown(node, f"reshape '{node.name}' {tuple(shape_in)} -> {tuple(shape_out)}", "reshape")


def _dim1_is_dynamic(node) -> bool:
    """``x.view(n, -1)`` follows the channel count after a cut; ``x.view(n, 512)`` does not."""
    shape_args = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = shape_args[0]
    if len(shape_args) < 2:
        return False
    return shape_args[1] == -1 or isinstance(shape_args[1], fx.Node)


@reads_stacked
def reduce(a, node):
    """``mean``, ``sum``, ``amax``, ``amin`` over dims other than the channels' keep the layout."""
    if any(a.stacked_layout(arg) for arg in node.all_input_nodes):
        return reduce_stacked(a, node)
    x = a.input_layout(node)
    return None if x is None else _reduce(a, node, x)


def _reduce(a, node, x: Layout):
    shape_in, shape_out = a.shape(node.args[0]), a.shape(node)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or shape_in is None or shape_out is None or len(shape_out) < 2:
        return a.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if any(d % len(shape_in) in (0, 1) for d in dims) or shape_out[1] != shape_in[1]:
        return a.unknown(node, f"reduction '{node.name}' over channels", "reduction over channels")
    return x


# -- modules (``call_module`` nodes; ``analysis.call_module`` has counted FLOPs and checked the input)


def conv(a, node):
    """A conv (or a transposed conv) starts a new space (its filters) and records the one it reads. Depthwise: channel ``c``
    filters channel ``c``. Grouped: conv-group ``g`` reads input block ``g``, writes output block ``g``;
    ``groups`` is kept and every block cut to the same width (equal counts on each axis, chosen per block)."""
    name, m, x = node.target, a.modules[node.target], a.input_layout(node)
    if m.transposed and m.groups > 1:
        return a.unknown(node, f"grouped {type(m).__name__} ('{name}')", f"grouped {type(m).__name__}")
    if m.groups == 1:  # a transposed conv too: its weight is (in, out, *kernel), the surgery knows
        a.record(name, "in", x)
        return a.output_space(name, m.out_channels)
    if m.groups == m.in_channels == m.out_channels:
        a.record(name, "dw", x)
        return x
    reason = f"grouped conv '{name}' (groups={m.groups})"
    a.record(name, "in", x)
    a.grouped(x, m.groups, reason)
    out = a.output_space(name, m.out_channels)
    a.grouped(out, m.groups, reason)
    return out


def linear(a, node):
    """A linear layer on ``(N, C)``: a new space of its outputs; it reads its input's layout."""
    name, m, x = node.target, a.modules[node.target], a.input_layout(node)
    if len(a.shape(node.args[0]) or ()) != 2:  # linear over the last dim of a >2-D tensor
        return a.unknown(node, f"Linear '{name}' on a tensor that is not (N, C)", "Linear on a tensor that is not (N, C)")
    a.record(name, "in", x)
    return a.output_space(name, m.out_features)


def norm(a, node):
    """A norm's entries see its input's channels; it passes them through. A norm alone reading a conv or
    linear output is noted (``ChannelGraph.norm_after``): a constant there can be absorbed by it."""
    name, x = node.target, a.input_layout(node)
    a.record(name, "bn", x)
    source = node.args[0]
    if (source.op == "call_module" and len(source.users) == 1
            and isinstance(a.modules[source.target], (_ConvNd, nn.Linear))):
        a.norm_after.setdefault(source.target, []).append(name)
    return x


# ---------------------------------------------------------------------------------------------------
# The default table (extend it: see ``registry``)

OPS = OpTable()
OPS.register([getattr], metadata)
OPS.register(_METADATA_METHODS, metadata, "methods")
OPS.register(_CHANNELWISE_FUNCTIONS, channelwise)
OPS.register(_CHANNELWISE_METHODS, channelwise, "methods")
OPS.register(_BINARY_FUNCTIONS, elementwise)
OPS.register(_BINARY_METHODS, elementwise, "methods")
OPS.register(_CAT_FUNCTIONS, cat)
OPS.register(_SPLIT_FUNCTIONS, split)
OPS.register(_SPLIT_METHODS, split, "methods")
OPS.register(_RESHAPE_FUNCTIONS, reshape)
OPS.register(_RESHAPE_METHODS, reshape, "methods")
OPS.register(_REDUCE_FUNCTIONS, reduce)
OPS.register(_REDUCE_METHODS, reduce, "methods")
OPS.register(_STACK_FUNCTIONS, stack)
OPS.register(_SOFTMAX_FUNCTIONS, softmax)
OPS.register(_SOFTMAX_METHODS, softmax, "methods")
OPS.register([operator.getitem], getitem)
OPS.register([torch.ops.aten.slice.Tensor], aten_slice)
OPS.register([_ConvNd], conv, "modules")
OPS.register([nn.Linear], linear, "modules")
OPS.register(NORM_TYPES, norm, "modules")
OPS.register(_CHANNELWISE_MODULES, channelwise, "modules")
OPS.register([nn.Flatten], flatten_module, "modules")

# ultralytics' C2f (YOLOv8/11): its forward splits cv1's output with chunk(2), which the trace follows,
# but the exporter swaps in forward_split, which splits at (self.c, self.c): keep c at half of cv1's width.
OPS.widths["ultralytics.nn.modules.block.C2f"] = lambda m: {"c": m.cv1.conv.out_channels // 2}
