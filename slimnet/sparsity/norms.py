"""``FrozenBatchNorm2d`` <-> ``BatchNorm2d``: make a detector's frozen norms learnable, and back.

Every torchvision detector built on pretrained weights normalises with
``torchvision.ops.misc.FrozenBatchNorm2d``: γ, β and the running statistics are *buffers*, so the
sparsity step has no γ gradient to push and the slimming plan has nothing learnt to rank. Swap them
for ``BatchNorm2d`` before sparsity training::

    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)   # or your pretrained one
    model = slimnet.sparsity.norms.unfreeze_batchnorm(model, eval_mode=True)      # γ, β now trainable

Eval outputs are unchanged (the same ``(x - mean) / sqrt(var + eps) * γ + β``, up to float rounding),
because the new layer takes FrozenBN's own ``eps`` (1e-5 by default in torchvision, 0.0 in a few
older detectron-style ports) and its running statistics.

``eval_mode=True`` is mmdetection's ``norm_eval=True``: the layer keeps normalising with its running
statistics (and never updates them) even while the model trains, which is what a pretrained detector
trained on batches of two images needs, yet γ and β are ordinary trainable parameters, so the L1 step
of Network Slimming still reaches them. ``freeze_batchnorm`` goes back, e.g. to ship a model that
behaves exactly like the torchvision original.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class EvalModeBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that stays in eval mode: ``model.train()`` does not switch it to batch
    statistics, so its running mean/var stay those of the pretrained network (mmdetection's
    ``norm_eval``). γ and β remain trainable parameters.

    A subclass rather than a flag on the model: Lightning calls ``model.train()`` at every epoch start
    and after every validation, and a subclass is the one place that survives all of those calls.
    It is still a ``_BatchNorm``, so tracing, the sparsity step and surgery treat it as any BatchNorm.
    Lightning's "Found N module(s) in eval mode at the start of training" warning counts these layers:
    expected, and the point.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def _from_frozen(frozen: FrozenBatchNorm2d, eval_mode: bool) -> nn.BatchNorm2d:
    cls = EvalModeBatchNorm2d if eval_mode else nn.BatchNorm2d
    w = frozen.weight
    bn = cls(w.numel(), eps=frozen.eps, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        bn.weight.copy_(frozen.weight)
        bn.bias.copy_(frozen.bias)
        bn.running_mean.copy_(frozen.running_mean)
        bn.running_var.copy_(frozen.running_var)
    bn.requires_grad_(True)  # the point of the conversion: γ gets a gradient for the L1 step
    bn.train(frozen.training)  # a no-op for EvalModeBatchNorm2d, by design
    return bn


def _to_frozen(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(
            f"{type(bn).__name__} without running statistics cannot be frozen: its eval output depends on "
            "the batch. Build it with track_running_stats=True"
        )
    c = bn.num_features
    ref = bn.running_mean
    frozen = FrozenBatchNorm2d(c, eps=bn.eps).to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if bn.affine:  # affine=False is γ = 1, β = 0, which FrozenBN's initial buffers already are
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    frozen.train(bn.training)
    return frozen


def _replace(model: nn.Module, match: type | tuple[type, ...], convert) -> tuple[nn.Module, int]:
    """Swap every ``match`` module of ``model`` for ``convert(module)``; the root itself too."""
    if isinstance(model, match):
        return convert(model), 1
    # list() first: the loop replaces children of the modules it walks
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, match)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert(m))
    return model, len(targets)


def unfreeze_batchnorm(model: nn.Module, eval_mode: bool = False) -> nn.Module:
    """Replace every ``FrozenBatchNorm2d`` in ``model`` by a trainable ``BatchNorm2d`` in place.

    Args:
        model: any module (a whole detector, its backbone, or a single FrozenBN).
        eval_mode: build ``EvalModeBatchNorm2d`` layers that keep using (and never update) their
            running statistics while the model trains, as mmdetection's ``norm_eval=True``; their γ and
            β still train. ``False`` gives plain ``BatchNorm2d`` (batch statistics in training).

    Returns:
        ``model`` (a new module only when ``model`` itself is a FrozenBN). Eval outputs are those of
        the frozen model; every converted γ and β has ``requires_grad=True``.
    """
    model, _ = _replace(model, FrozenBatchNorm2d, lambda m: _from_frozen(m, eval_mode))
    return model


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` (including ``EvalModeBatchNorm2d``) by ``FrozenBatchNorm2d`` in
    place, keeping eval outputs; the inverse of :func:`unfreeze_batchnorm`. Returns ``model``."""
    model, _ = _replace(model, nn.BatchNorm2d, _to_frozen)
    return model
