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

import contextlib
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimnet.graph import COMPUTE_OPS, NORM_TYPES, as_batch_of_two, meta_shapes, symbolic_graph
from slimnet.modes import preserved_modes


def _first_example(example_inputs):
    """Normalise ``example_inputs`` (a tensor or a tuple of tensors) to a tuple with batch size 1."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in example_inputs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


def reads_training(model: nn.Module) -> bool:
    """Whether any module's own code reads ``training`` (``if self.training``, ``F.dropout(training=…)``):
    then its traced graph may differ between train and eval mode (auxiliary heads), and eval-mode FLOPs
    need an eval-mode trace. torch.nn's own modules are leaves or mode-free containers."""
    seen = set()
    for m in model.modules():
        for klass in type(m).__mro__:
            if klass in seen or klass.__module__.startswith("torch.nn") or klass is object:
                continue
            seen.add(klass)
            for value in vars(klass).values():
                if _names_training(getattr(value, "__code__", None)):
                    return True
    return False


def _names_training(code) -> bool:
    if code is None:
        return False
    return "training" in code.co_names or any(_names_training(c) for c in code.co_consts if hasattr(c, "co_names"))


def weight_uses(model: nn.Module, example_inputs) -> dict[str, int] | None:
    """Per conv / linear layer, output positions per sample (summed over calls), in eval mode; None when
    the forward cannot be traced or computes outside those layers (then count with FlopCounterMode)."""
    with preserved_modes(model):
        model.eval()
        try:
            graph = symbolic_graph(model, ())
            shapes = meta_shapes(model, graph, as_batch_of_two(example_inputs))
        except Exception:  # noqa: BLE001 - untraceable, or needs real data: FlopCounterMode will count it
            return None
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        name = getattr(node.target, "__name__", node.target)
        if node.op in ("call_function", "call_method") and name in COMPUTE_OPS:
            return None
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            transposed = isinstance(m, nn.modules.conv._ConvNd) and m.transposed  # one MAC per weight per input
            shape = shapes.get(node.args[0].name if transposed else node.name)
            if not isinstance(shape, torch.Size):
                return None
            # conv: (N, C, *space) -> prod(space); linear: (N, *, F) -> prod(*)
            rest = shape[2:] if not isinstance(m, nn.Linear) else shape[1:-1]
            uses[node.target] = uses.get(node.target, 0) + math.prod(rest)
        elif any(True for _ in m.parameters(recurse=False)) and not isinstance(m, NORM_TYPES):
            return None  # a leaf with weights we do not model (a user's black box)
    return uses


@torch.no_grad()
def weight_uses_from_forward(model: nn.Module, inputs, hooks=None) -> dict[str, int] | None:
    """:func:`weight_uses` from one real eval-mode forward on ``inputs``, for forwards fx cannot trace.

    Forward hooks count each conv / linear output's positions; FlopCounterMode counts the same forward,
    and the uses are returned only when they explain all of its FLOPs (else None: count another way).
    ``hooks``: a context manager entered for the same forward (β folding records its inputs there).
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
    uses: dict[str, int] = {}

    def count(name):
        def hook(m, args, out):
            if getattr(m, "transposed", False):  # one MAC per weight per input position
                out = args[0] if args else None
            if isinstance(out, torch.Tensor) and out.dim() >= 2:  # positions = outputs / (channels x batch)
                channels = out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1]
                uses[name] = uses.get(name, 0) + out.numel() // (channels * batch)
        return hook

    handles = [m.register_forward_hook(count(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with preserved_modes(model), (hooks if hooks is not None else contextlib.nullcontext()):
            model.eval()
            counter = FlopCounterMode(display=False)
            with counter:
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
    if flops_from_uses(model, uses) * batch != counter.get_total_flops():
        return None
    return uses


def flops_from_uses(model: nn.Module, uses: dict[str, int]) -> int:
    """FLOPs (2 x MACs) of one sample: each conv / linear spends one MAC per weight per output position
    (a transposed conv: per input position)."""
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
