"""FLOPs and parameter counts.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 x MACs (one multiply and
one add) the way Liu et al. 2017 report them: 796M for their CIFAR VGG-19 against the paper's 7.97e8.
Counted on a batch of one in eval mode, so BatchNorm and dropout behave as at deployment.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimnet._modes import preserved_modes


def _first_example(example_inputs):
    """Normalise ``example_inputs`` (a tensor or a tuple of tensors) to a tuple with batch size 1."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in example_inputs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


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
