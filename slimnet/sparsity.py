"""The sparsity term of Network Slimming: an L1 penalty λ·Σ|γ| on every BatchNorm scale γ.

Liu et al. 2017 add λ·sign(γ) to each γ gradient after backward and before the optimizer step
(``updateBN`` in Eric-mingjie/network-slimming). Done that way inside a modern training loop, the term
is silently changed by what sits between backward and the step: gradient clipping rescales it, and an
adaptive optimizer (Adam, AdamW) divides it by √v, which is no L1 penalty at all. So the step is applied
*by the optimizer's own step hooks*, around the real update, after clipping, AMP unscaling and gradient
accumulation, and it is skipped whenever the step is (an AMP overflow):

- ``"subgradient"`` (SGD, the paper's): exactly what adding λ·sign(γ) to the gradient right before the
  update would do, momentum, dampening and Nesterov included. SGD is linear in the gradient, so the
  extra term is added after the update to the momentum buffer and to γ. Clipping never scales it.
- ``"proximal"`` (every other optimizer): after the update, γ ← sign(γ)·max(|γ| − lr·λ, 0), the
  proximal step of lr·λ·|γ| (soft-thresholding, as decoupled weight decay is for L2). γ reaches exactly 0
  and stays there instead of oscillating around it.

``mode="auto"`` picks the first for ``torch.optim.SGD`` and the second for anything else.

For a hand-written loop: ``handle = attach_l1(optimizer, model, lam=1e-4)`` once, then train as usual;
or call ``add_l1_subgradient(model, lam)`` yourself right before ``optimizer.step()`` (the paper's way).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MODES = ("auto", "subgradient", "proximal")


def bn_gammas(model: nn.Module) -> list[nn.Parameter]:
    """γ of every BatchNorm (any ``_BatchNorm``: BN1d/2d/3d and SyncBatchNorm) that has one."""
    return [m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


def _as_gammas(where: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return bn_gammas(where) if isinstance(where, nn.Module) else list(where)


@torch.no_grad()
def add_l1_subgradient(gammas: nn.Module | Iterable[torch.Tensor], lam: float) -> None:
    """grad(γ) += λ·sign(γ) for every γ that has a gradient (frozen ones are skipped).

    ``gammas``: a model (all its BatchNorm γ) or a list of γ tensors. Call it right before
    ``optimizer.step()`` and after any gradient clipping, as the paper's ``updateBN`` does; with an
    adaptive optimizer prefer ``attach_l1`` (which takes a proximal step instead).
    """
    if lam == 0:
        return
    pairs = [(g.grad, g) for g in _as_gammas(gammas) if g.grad is not None]
    if not pairs:
        return
    grads, weights = zip(*pairs)
    torch._foreach_add_(list(grads), torch._foreach_sign(list(weights)), alpha=lam)


@torch.no_grad()
def l1_proximal_step(gammas: nn.Module | Iterable[torch.Tensor], lam: float, lr: float) -> None:
    """γ ← sign(γ)·max(|γ| − lr·λ, 0): the proximal step of lr·λ·|γ|, taken after an optimizer step."""
    if lam == 0 or lr == 0:
        return
    for g in _as_gammas(gammas):
        g.copy_(g.sign() * (g.abs() - lr * lam).clamp_min(0))


def resolve_mode(optimizer: torch.optim.Optimizer, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"sparsity mode {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    is_sgd = isinstance(optimizer, torch.optim.SGD)
    if mode == "auto":
        return "subgradient" if is_sgd else "proximal"
    if mode == "subgradient" and not is_sgd:
        raise ValueError(f"sparsity mode 'subgradient' is exact only for SGD, not {type(optimizer).__name__} "
                         "(an adaptive optimizer would divide λ·sign(γ) by √v); use mode='proximal' or 'auto'")
    return mode


class L1Step:
    """The L1 step on ``gammas``, applied at every ``optimizer.step()`` through the optimizer's hooks.

    Args:
        optimizer: the optimizer that updates the γ (γ it does not hold get a warning, not a step).
        gammas: the BatchNorm γ to penalise (``bn_gammas(model)``).
        lam: λ, or a function returning the current λ (a schedule; 0 turns the step off).
        mode: ``"auto"``, ``"subgradient"`` (SGD only) or ``"proximal"``; see the module docstring.

    ``remove()`` detaches it. ``last_lam`` is the λ of the last step taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gammas: Iterable[torch.Tensor],
                 lam: float | Callable[[], float], mode: str = "auto"):
        self.optimizer = optimizer
        self.mode = resolve_mode(optimizer, mode)
        self.lam = lam if callable(lam) else (lambda value=float(lam): value)
        self.last_lam = 0.0
        self._pending: tuple | None = None
        self._groups = self._by_group(list(gammas))
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def _by_group(self, gammas: list[torch.Tensor]) -> list[tuple[dict, list[torch.Tensor]]]:
        """The γ of each param group, so each is stepped with its own group's lr and momentum."""
        wanted = {id(g): g for g in gammas if g.requires_grad}
        groups = []
        for group in self.optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in wanted]
            if mine:
                if group.get("maximize", False):
                    raise ValueError("the L1 step cannot be taken by a maximizing optimizer (maximize=True)")
                groups.append((group, mine))
        held = sum(len(mine) for _, mine in groups)
        if held < len(wanted):
            warnings.warn(f"{len(wanted) - held} of {len(wanted)} trainable BatchNorm γ are not in the optimizer "
                          f"({type(self.optimizer).__name__}): they get no sparsity step", stacklevel=3)
        return groups

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        # Runs before the update (and, in Lightning, before the closure computes the gradients): γ still
        # holds the value the update starts from, whose sign is the subgradient's.
        lam = float(self.lam())
        self.last_lam = lam
        if lam == 0 or not self._groups:
            self._pending = None
            return
        signs = [torch._foreach_sign(mine) for _, mine in self._groups]
        fresh = [[optimizer.state.get(p, {}).get("momentum_buffer") is None for p in mine] for _, mine in self._groups]
        self._pending = (lam, signs, fresh)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            return
        lam, signs, fresh = self._pending
        self._pending = None
        for (group, mine), sign, first in zip(self._groups, signs, fresh):
            stepped = [i for i, p in enumerate(mine) if p.grad is not None]  # no gradient, no update
            if not stepped:
                continue
            if self.mode == "proximal":
                l1_proximal_step([mine[i] for i in stepped], lam, group["lr"])
            else:
                self._sgd_extra(optimizer, group, [mine[i] for i in stepped], [sign[i] for i in stepped],
                                [first[i] for i in stepped], lam)

    @staticmethod
    def _sgd_extra(optimizer, group: dict, params, signs, first, lam: float) -> None:
        """What e = λ·sign(γ) added to the gradient would have changed in this SGD update.

        torch's SGD: buf ← μ·buf + (1−d)·g (buf ← g on the first step); update = g + μ·buf (Nesterov)
        or buf; γ ← γ − lr·update. Everything is linear in g, so e adds k_buf·e to buf and k_γ·e to the
        update, with k depending on μ, d, Nesterov and whether the buffer existed before this step.
        """
        lr, mu = group["lr"], group.get("momentum", 0.0)
        damp, nesterov = group.get("dampening", 0.0), group.get("nesterov", False)
        for p, s, is_first in zip(params, signs, first):
            if mu == 0:
                p.add_(s, alpha=-lr * lam)
                continue
            k_buf = 1.0 if is_first else 1.0 - damp
            k_upd = 1.0 + mu * k_buf if nesterov else k_buf
            buf = optimizer.state[p]["momentum_buffer"]
            buf.add_(s, alpha=k_buf * lam)
            p.add_(s, alpha=-lr * k_upd * lam)


def attach_l1(optimizer: torch.optim.Optimizer, model: nn.Module, lam: float | Callable[[], float],
              mode: str = "auto") -> L1Step:
    """Penalise every BatchNorm γ of ``model`` with λ·|γ| at each ``optimizer.step()``; see ``L1Step``.

    Example (a hand-written loop)::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        slimnet.attach_l1(opt, model, lam=1e-4)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """
    return L1Step(optimizer, bn_gammas(model), lam, mode)


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
