"""FLOPs and parameter counts.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 x MACs (one multiply and
one add) the way Liu et al. 2017 report them: 796M for their CIFAR VGG-19 against the paper's 7.97e8.
Counted on a batch of one in eval mode, so BatchNorm and dropout behave as at deployment.

:func:`weight_uses` counts on shapes only: a conv or linear layer spends ``2 x weight.numel()`` FLOPs per
output position, and positions do not change when channels are cut. So one eval-mode ``torch.fx`` trace
with shapes from the meta device (``graph``: no compute, the model untouched) gives every layer's
positions, and the FLOPs of the model before *and* after a cut are a sum over its current weights:
resnet50 at 224, ~30 ms against ~300 ms for a FlopCounterMode forward on two busy cores (a meta-device
forward under FlopCounterMode is no faster than a real one: its kernels run in Python).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimnet._modes import preserved_modes
from slimnet.graph import _as_batch_of_two, _meta_shapes, _trace

# Ops that compute FLOPs FlopCounterMode counts, outside conv and linear modules: a graph holding one is
# counted by FlopCounterMode, so the two counts never disagree.
_COMPUTE_OPS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "linear", "conv1d", "conv2d", "conv3d",
                "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention",
                "__matmul__", "addbmm", "addmv", "mv", "tensordot", "bilinear"}


def _first_example(example_inputs):
    """Normalise ``example_inputs`` (a tensor or a tuple of tensors) to a tuple with batch size 1."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in example_inputs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


def weight_uses(model: nn.Module, example_inputs) -> dict[str, int] | None:
    """Per conv / linear layer, output positions per sample (summed over calls), in eval mode; None when
    the forward cannot be traced or computes outside those layers (then count with FlopCounterMode)."""
    with preserved_modes(model):
        model.eval()
        try:
            graph = _trace(model, ())
            shapes = _meta_shapes(model, graph, _as_batch_of_two(example_inputs))
        except Exception:  # noqa: BLE001 - untraceable, or needs real data: FlopCounterMode will count it
            return None
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        name = getattr(node.target, "__name__", node.target)
        if node.op in ("call_function", "call_method") and name in _COMPUTE_OPS:
            return None
        if node.op != "call_module":
            continue
        m, shape = modules[node.target], shapes.get(node.name)
        if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed):
            if not isinstance(shape, torch.Size):
                return None
            # conv: (N, C, *space) -> prod(space); linear: (N, *, F) -> prod(*)
            rest = shape[2:] if not isinstance(m, nn.Linear) else shape[1:-1]
            uses[node.target] = uses.get(node.target, 0) + math.prod(rest)
        elif any(True for _ in m.parameters(recurse=False)) and not isinstance(m, nn.modules.batchnorm._NormBase):
            return None  # a leaf with weights we do not model (a user's black box)
    return uses


def flops_from_uses(model: nn.Module, uses: dict[str, int]) -> int:
    """FLOPs (2 x MACs) of one sample: each conv / linear spends one MAC per weight per output position."""
    modules = dict(model.named_modules())
    return sum(2 * modules[name].weight.numel() * n for name, n in uses.items())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs) -> tuple[int, int]:
    """Return ``(flops, params)`` of one forward pass on a batch of one, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    inputs = _first_example(example_inputs)
    with preserved_modes(model):
        model.eval()
        counter = FlopCounterMode(display=False)
        with counter:
            model(*inputs)
    return int(counter.get_total_flops()), count_params(model)
