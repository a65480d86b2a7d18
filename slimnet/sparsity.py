"""The sparsity term of Network Slimming: an L1 penalty on every BatchNorm scale γ.

Liu et al. 2017 add λ·Σ|γ| to the loss; its subgradient λ·sign(γ) is added to each γ gradient after
backward and before the optimizer step (reference code: ``updateBN`` in Eric-mingjie/network-slimming).
Adding it to the gradient rather than the loss costs one fused op per step and leaves the logged loss
the plain cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def bn_gammas(model: nn.Module) -> list[nn.Parameter]:
    """γ of every BatchNorm (any ``_BatchNorm``: BN1d/2d/3d and SyncBatchNorm) that has one."""
    return [m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


@torch.no_grad()
def add_l1_subgradient(gammas: list[nn.Parameter], lam: float) -> None:
    """grad(γ) += λ·sign(γ) for every γ that has a gradient (frozen ones are skipped)."""
    if lam == 0:
        return
    pairs = [(g.grad, g) for g in gammas if g.grad is not None]
    if not pairs:
        return
    grads, weights = zip(*pairs)
    torch._foreach_add_(list(grads), torch._foreach_sign(list(weights)), alpha=lam)


@torch.no_grad()
def init_gammas(model: nn.Module, value: float) -> None:
    """Set every γ to ``value`` (0.5 in Liu et al. 2017: a smaller start lets L1 reach zero sooner)."""
    for gamma in bn_gammas(model):
        gamma.fill_(value)


@torch.no_grad()
def gamma_stats(model: nn.Module, small: float = 1e-2) -> dict[str, float]:
    """Summary of |γ| over the whole network: the L1 term, its mean, and the share below ``small``."""
    gammas = bn_gammas(model)
    if not gammas:
        return {}
    flat = torch.cat([g.detach().abs().flatten().float() for g in gammas])
    return {
        "l1": float(flat.sum()),
        "mean": float(flat.mean()),
        "frac_small": float((flat < small).float().mean()),
    }
