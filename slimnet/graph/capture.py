"""The second way in: capture a forward with ``torch.export`` when ``torch.fx`` symbolic tracing cannot.

Symbolic tracing fails on forwards that branch on shapes (``if h % 32``) or unpack proxies (``*args``,
``list(x.chunk(2, 1))`` in ultralytics' C2f). ``torch.export`` runs the forward on fake tensors with
concrete shapes, so it specialises those branches and unpacks freely; what it returns is an ATen-level
graph whose parameters are lifted to inputs. :func:`export_graph` turns that back into the graph
``graph.analysis`` reads: every ``aten.conv*`` / ``aten.linear`` / ``aten.batch_norm`` whose weight is a
parameter of one of the model's own conv, linear or norm modules becomes a ``call_module`` of that module
(so the cut edits the user's module objects), the ATen ops we model become the torch functions they
implement, and anything else stays an ATen op, which the analysis does not know and so leaves whole.
Shapes come with the graph (each node's fake value): nothing is run for real.

Knows nothing of Lightning or Hydra.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

aten = torch.ops.aten

# ATen op -> the torch function (or tensor method name) the channel analysis models it by.
_FUNCTIONS = {
    aten.relu: torch.relu, aten.relu_: torch.relu, aten.silu: F.silu, aten.silu_: F.silu,
    aten.sigmoid: torch.sigmoid, aten.sigmoid_: torch.sigmoid, aten.tanh: torch.tanh, aten.tanh_: torch.tanh,
    aten.hardswish: F.hardswish, aten.hardswish_: F.hardswish, aten.hardsigmoid: F.hardsigmoid,
    aten.hardsigmoid_: F.hardsigmoid, aten.hardtanh: F.hardtanh, aten.hardtanh_: F.hardtanh,
    aten.gelu: F.gelu, aten.leaky_relu: F.leaky_relu, aten.leaky_relu_: F.leaky_relu, aten.elu: F.elu,
    aten.mish: F.mish, aten.dropout: F.dropout, aten.clamp: torch.clamp, aten.clamp_min: torch.clamp,
    aten.max_pool1d: F.max_pool1d, aten.max_pool2d: F.max_pool2d, aten.max_pool3d: F.max_pool3d,
    aten.avg_pool1d: F.avg_pool1d, aten.avg_pool2d: F.avg_pool2d, aten.avg_pool3d: F.avg_pool3d,
    aten.adaptive_avg_pool1d: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d: F.adaptive_avg_pool2d,
    aten.adaptive_max_pool2d: F.adaptive_max_pool2d, aten.upsample_nearest2d: F.interpolate,
    aten.upsample_bilinear2d: F.interpolate, aten.constant_pad_nd: F.pad, aten.pad: F.pad,
    aten.add: operator.add, aten.add_: operator.add, aten.sub: operator.sub, aten.sub_: operator.sub,
    aten.mul: operator.mul, aten.mul_: operator.mul, aten.div: operator.truediv, aten.div_: operator.truediv,
    aten.cat: torch.cat, aten.chunk: torch.chunk, aten.split: torch.split, aten.split_with_sizes: torch.split,
    aten.flatten: torch.flatten, aten.mean: torch.mean, aten.sum: torch.sum, aten.amax: torch.amax,
}
_METHODS = {aten.view: "view", aten.reshape: "reshape", aten._unsafe_view: "view", aten.clone: "clone",
            aten.contiguous: "contiguous", aten.squeeze: "squeeze", aten.unsqueeze: "unsqueeze",
            aten.detach: "detach", aten.alias: "detach"}  # detach: YOLOv10/26's one-to-one head reads x.detach()
_CONVS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d}
_NORMS = {aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
          aten.native_batch_norm, aten._native_batch_norm_legit}


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.shape for v in value)
    return None


def export_graph(model: nn.Module, example_inputs: tuple, norm_types: tuple[type, ...]) -> tuple[fx.Graph, dict]:
    """``(graph, shapes)`` of ``model``'s forward captured by ``torch.export``, with module targets.

    Raises whatever ``torch.export.export`` raises when it cannot capture the forward.
    """
    program = torch.export.export(model, tuple(example_inputs), strict=False)
    signature = program.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}  # placeholder -> qualified name
    modules = dict(model.named_modules())

    def owner(node, types):
        """The model's module of ``types`` whose ``weight`` this placeholder is, else None."""
        name = lifted.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        if name is None or not name.endswith(".weight"):
            return None
        module_name = name[: -len(".weight")]
        return module_name if isinstance(modules.get(module_name), types) else None

    graph, env, shapes = fx.Graph(), {}, {}
    for node in program.graph.nodes:
        def mapped(a):
            return fx.node.map_arg(a, lambda n: env[n])
        new = None
        if node.op == "placeholder":
            if node.name in lifted:  # a parameter or buffer: a constant to the analysis
                new = graph.get_attr(lifted[node.name])
            else:
                new = graph.placeholder(node.name)
        elif node.op == "output":  # the user's outputs, each with its key path in the returned structure
            user = [a for a, spec in zip(node.args[0], signature.output_specs)
                    if spec.kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
            out_spec = program.call_spec.out_spec
            paths = [p for p, _ in pytree.tree_flatten_with_path(
                pytree.tree_unflatten(list(range(len(user))), out_spec))[0]] if out_spec is not None else None
            keep = [i for i, a in enumerate(user) if isinstance(a, fx.Node)]
            out = graph.output(tuple(mapped(user[i]) for i in keep))
            if paths is not None and len(paths) == len(user):
                out.meta["output_paths"] = [paths[i] for i in keep]
            continue
        elif node.op == "call_function":
            packet = getattr(node.target, "overloadpacket", None)
            module = None
            if packet in _CONVS:
                module = owner(node.args[1], _ConvNd)
            elif packet is aten.linear:
                module = owner(node.args[1], nn.Linear)
            elif packet in _NORMS:
                module = owner(node.args[1], norm_types)
            if module is not None:
                new = graph.call_module(module, (mapped(node.args[0]),))
            elif (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                  and env[node.args[0]].op == "call_module" and node.args[1] == 0):
                env[node] = env[node.args[0]]  # a functional norm's (out, mean, var): item 0 is the norm
                continue
            elif packet in _FUNCTIONS:
                new = graph.call_function(_FUNCTIONS[packet], mapped(node.args), mapped(node.kwargs))
            elif packet in _METHODS:
                new = graph.call_method(_METHODS[packet], mapped(node.args), mapped(node.kwargs))
            else:  # an op the analysis does not model: kept as is, so it leaves its channels whole
                new = graph.call_function(node.target, mapped(node.args), mapped(node.kwargs))
        else:
            new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        shapes[new.name] = _shape_of(node.meta.get("val"))
        if "nn_module_stack" in node.meta:  # which module ran the op: where split sizes may live
            new.meta["nn_module_stack"] = node.meta["nn_module_stack"]
    return graph, shapes
