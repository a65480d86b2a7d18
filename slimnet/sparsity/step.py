"""The sparsity term of Network Slimming: a penalty λ·R(γ) on every BatchNorm scale γ.

Two regularizers R (``kind``):

- ``"l1"``: R = Σ|γ| (Liu et al. 2017), subgradient sign(γ). It pulls *every* γ towards 0.
- ``"polarization"``: R = t·Σ|γ| − Σ|γ − mean(γ)| with γ kept in [0, a] (Zhuang et al., NeurIPS 2020).
  The second term pushes γ away from their mean, so they split into a cluster at 0 and one away from
  it, and any threshold between the clusters cuts the same channels. Subgradient:
  t·sign(γᵢ) − sign(γᵢ − γ̄) + mean_j sign(γⱼ − γ̄) (γ̄ depends on every γ), over all the γ penalised
  together; after each step γ is clamped to [0, a].

Liu et al. 2017 add λ·sign(γ) to each γ gradient after backward and before the optimizer step
(``updateBN`` in Eric-mingjie/network-slimming). Done that way inside a modern training loop, the term
is silently changed by what sits between backward and the step: gradient clipping rescales it, and an
adaptive optimizer (Adam, AdamW) divides it by √v, which is no L1 penalty at all. So the step is applied
*by the optimizer's own step hooks*, around the real update, after clipping, AMP unscaling and gradient
accumulation, and it is skipped whenever the update is: GradScaler skips ``step()`` on an overflow, or,
for fused optimizers (``fused=True``), calls it with ``optimizer.found_inf`` set and lets the kernel
skip; the hook reads ``found_inf`` and leaves γ and the momentum buffers untouched too.

- ``"subgradient"`` (SGD, the paper's): exactly what adding λ·sign(γ) to the gradient right before the
  update would do, momentum, dampening and Nesterov included. SGD is linear in the gradient, so the
  extra term is added after the update to the momentum buffer and to γ. Clipping never scales it.
- ``"proximal"`` (every other optimizer): after the update, the proximal step of λ·|γ| *in the metric
  the optimizer itself stepped in*: γ ← sign(γ)·max(|γ| − lr·λ·s, 0), with s the optimizer's
  per-element preconditioner for that γ, read from its state (soft-thresholding; γ reaches exactly 0 and
  stays there instead of oscillating around it):

  ========================  =====================================================================
  SGD                       s = 1
  Adam, AdamW, NAdam        s = 1/(√v̂ + ε), v̂ = exp_avg_sq/(1 − β₂ᵗ) (max_exp_avg_sq with amsgrad)
  RAdam                     s = r·√(1 − β₂ᵗ)/(√v + ε) once rectified (r its rectification), 1 before
  Adamax                    s = 1/u (u its exp_inf)
  anything else             s = 1, with a warning naming the optimizer (see below)
  ========================  =====================================================================

  Polarization has no closed-form proximal step: there the step is γ ← γ − lr·λ·s·∂R(γ) after the
  update, then the clamp.

What λ means. Under SGD's subgradient λ is a gradient: it is added to ∂L/∂γ, and a γ ends near 0
(oscillating by about lr·λ/(1 − momentum)) exactly when its loss gradient stays below λ in size. Under
Adam-type optimizers with the preconditioned proximal step it is a gradient too: Adam moves γ by
lr·m̂/(√v̂ + ε) and the proximal step pulls it back by lr·λ/(√v̂ + ε), so a γ at 0 stays at exactly 0
while its momentum-averaged loss gradient |m̂| ≤ λ, the optimality condition of λ·|γ| (and of proximal
SGD without momentum). λ is therefore compared with the size of ∂L/∂γ, not with a step length, and a
value draws the same line between kept and zeroed γ under SGD and AdamW; how fast γ get there is each
optimizer's own step length (docs/sparsity.md measures the range for AdamW on the default model).
The plain step lr·λ would not: Adam's normalised steps are about lr each whatever the gradient, so a
γ would move by lr·λ (1.6e-4 in 16 steps at lr 1e-3, λ 1e-2) and Adam's moments, which never see the
penalty, would push a zeroed γ off 0 again at the next step. Optimizers outside the table keep that plain
step (λ then is a length per unit of lr, not comparable across optimizers), with a warning. Under
``mode="proximal"`` with SGD and momentum μ, the plain step compares λ with the momentum-summed
gradient: a γ stays at 0 while |∂L/∂γ| ≤ (1 − μ)·λ.

``mode="auto"`` picks the first for ``torch.optim.SGD`` and the second for anything else.

For a hand-written loop: ``handle = attach_l1(optimizer, model, lam=1e-4)`` once, then train as usual;
or call ``add_l1_subgradient(model, lam)`` yourself right before ``optimizer.step()`` (the paper's way).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MODES = ("auto", "subgradient", "proximal")
KINDS = ("l1", "polarization")
# Polarization's weight of its L1 term. The reference (polarizationpruning/PolarizationPruning, README at
# f19f3fd) trains CIFAR-10 ResNet-56 with t = 1.4 and VGG-16 with t = 1.5, ImageNet ResNet-50 with 1.2
# and MobileNetV2 with 1.0; the default model (a small VGG on 28x28 Fashion-MNIST) is CIFAR-size.
POLARIZATION_T = 1.4


class Penalty:
    """A regularizer on γ: its subgradient direction ∂R/∂γ and what to enforce after each step."""

    kind = "l1"

    def direction(self, gammas: list[torch.Tensor]) -> list[torch.Tensor]:
        return torch._foreach_sign(gammas)

    def project(self, gammas: list[torch.Tensor]) -> None:
        pass


class Polarization(Penalty):
    """R(γ) = t·Σ|γ| − Σ|γ − mean(γ)|, γ ∈ [0, bound] (Zhuang et al. 2020, eq. 2). Their code clamps γ
    to [0, 1] (``--clamp 1.0``) and takes γ̄ over all the penalised γ; t = 1.4–1.5 for CIFAR networks,
    1.2 for ImageNet ResNet-50 (``POLARIZATION_T``)."""

    kind = "polarization"

    def __init__(self, t: float = POLARIZATION_T, bound: float = 1.0):
        if not t > 0 or not bound > 0:
            raise ValueError(f"polarization needs t > 0 and bound > 0, got t={t}, bound={bound}")
        self.t, self.bound = float(t), float(bound)

    def direction(self, gammas: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([g.detach().reshape(-1) for g in gammas])
        away = torch.sign(flat - flat.mean())
        d = self.t * torch.sign(flat) - away + away.mean()  # the mean's own dependence on each γ
        return [part.view_as(g) for part, g in zip(d.split([g.numel() for g in gammas]), gammas)]

    @torch.no_grad()
    def project(self, gammas: list[torch.Tensor]) -> None:
        for g in gammas:
            g.clamp_(0.0, self.bound)


def make_penalty(kind: str = "l1", t: float = POLARIZATION_T, bound: float = 1.0) -> Penalty:
    if kind not in KINDS:
        raise ValueError(f"sparsity kind {kind!r} is unknown; choose one of: {', '.join(KINDS)}")
    return Polarization(t, bound) if kind == "polarization" else Penalty()


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
    """γ ← sign(γ)·max(|γ| − lr·λ, 0): the proximal step of lr·λ·|γ| in SGD's metric, after a step.
    (``attach_l1`` takes it in the optimizer's own metric instead; see the module docstring.)"""
    if lam == 0 or lr == 0:
        return
    for g in _as_gammas(gammas):
        _soft_threshold(g, lr * lam)


def _soft_threshold(g: torch.Tensor, amount: float | torch.Tensor) -> None:
    """γ ← sign(γ)·max(|γ| − amount, 0), ``amount`` a number or one per element."""
    g.copy_(g.sign() * (g.abs() - amount).clamp_min(0))


# -- the metric each optimizer steps in --------------------------------------------------------------
# s(group, state) -> the per-element factor s of the proximal step lr·λ·s for one γ, read from the
# optimizer's state after its update (so it is the same s that update used), or None when the state
# lacks what it needs (the plain step is then taken, with a warning).
Preconditioner = Callable[[dict, dict], "float | torch.Tensor | None"]


def _sgd_metric(group: dict, state: dict) -> float:
    return 1.0


def _adam_metric(group: dict, state: dict) -> torch.Tensor | None:
    """1/(√v̂ + ε): Adam's and AdamW's update is lr·m̂/(√v̂ + ε); NAdam's has the same denominator (its
    Nesterov weights on g and m sum to about 1)."""
    v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
    if v is None or "step" not in state:
        return None
    bias2 = 1 - group["betas"][1] ** state["step"]  # a tensor step stays a tensor: no device sync
    return 1 / ((v / bias2).sqrt() + group["eps"])


def _radam_metric(group: dict, state: dict) -> float | torch.Tensor | None:
    """RAdam's update is lr·m̂·r·√(1 − β₂ᵗ)/(√v + ε) once its variance is rectified (ρₜ > 5, about the
    6th step at β₂ = 0.999) and plain lr·m̂ before (``torch.optim.RAdam``, Liu et al. 2020)."""
    v = state.get("exp_avg_sq")
    if v is None or "step" not in state:
        return None
    beta2, step = group["betas"][1], float(state["step"])
    bias2 = 1 - beta2 ** step
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2 ** step / bias2
    if rho <= 5:
        return 1.0
    rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return rect * math.sqrt(bias2) / (v.sqrt() + group["eps"])


def _adamax_metric(group: dict, state: dict) -> torch.Tensor | None:
    """1/u: Adamax's update is lr·m̂/u, u = max(β₂·u, |g| + ε) (``exp_inf``, never 0)."""
    u = state.get("exp_inf")
    return None if u is None else 1 / u


PRECONDITIONERS: dict[type, Preconditioner] = {
    torch.optim.SGD: _sgd_metric,
    torch.optim.Adam: _adam_metric,
    torch.optim.AdamW: _adam_metric,
    torch.optim.NAdam: _adam_metric,
    torch.optim.RAdam: _radam_metric,
    torch.optim.Adamax: _adamax_metric,
}


def preconditioner(optimizer: torch.optim.Optimizer) -> Preconditioner | None:
    """The metric of ``optimizer``'s class or its nearest known base (a subclass of Adam steps as Adam)."""
    for cls in type(optimizer).__mro__:
        if cls in PRECONDITIONERS:
            return PRECONDITIONERS[cls]
    return None


def _plain_step_warning(optimizer: torch.optim.Optimizer) -> str:
    known = ", ".join(cls.__name__ for cls in PRECONDITIONERS)
    return (f"sparsity: no preconditioner is known for {type(optimizer).__name__}, so its proximal step is the "
            "plain γ ← sign(γ)·max(|γ| − lr·λ, 0): λ there is a step length per unit of lr, not a gradient, "
            f"and a λ tuned for {known} does not carry over (see slimnet.sparsity.step)")


def _skipped(optimizer: torch.optim.Optimizer) -> bool:
    """True when GradScaler found inf/NaN gradients and handed the step to a fused optimizer to skip.

    Non-fused optimizers are never stepped on an overflow; fused ones (``_step_supports_amp_scaling``)
    are, with ``found_inf`` set for their kernel to skip the update, only while ``step()`` and its hooks
    run. Reading it syncs with the device once per step, only in that case."""
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is not None and bool(found_inf)


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


class SparsityStep:
    """The sparsity step on ``gammas``, applied at every ``optimizer.step()`` through the optimizer's hooks.

    Args:
        optimizer: the optimizer that updates the γ (γ it does not hold get a warning, not a step).
        gammas: the BatchNorm γ to penalise (``bn_gammas(model)``).
        lam: λ, or a function returning the current λ (a schedule; 0 turns the step off).
        mode: ``"auto"``, ``"subgradient"`` (SGD only) or ``"proximal"`` (in the optimizer's own
            metric: ``PRECONDITIONERS``); see the module docstring for what λ means under each.
        penalty: the regularizer (default L1; ``Polarization(t, bound)``).

    ``remove()`` detaches it. ``last_lam`` is the λ of the last step taken. A step the optimizer skips
    (an AMP overflow, also under fused optimizers) is skipped here too.

    Warns (once) when the proximal step has no known metric for the optimizer and falls back to lr·λ.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gammas: Iterable[torch.Tensor],
                 lam: float | Callable[[], float], mode: str = "auto", penalty: Penalty | None = None):
        self.optimizer = optimizer
        self.mode = resolve_mode(optimizer, mode)
        self.penalty = penalty or Penalty()
        self.lam = lam if callable(lam) else (lambda value=float(lam): value)
        self.last_lam = 0.0
        self.taken = 0  # updates the optimizer really made (an AMP overflow's skipped step is not one)
        self._pending: tuple | None = None
        self._groups = self._by_group(list(gammas))
        self._metric = preconditioner(optimizer) if self.mode == "proximal" else None
        self._warned = False
        if self.mode == "proximal" and self._metric is None:
            self._warn_plain()
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

    def _warn_plain(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(_plain_step_warning(self.optimizer), stacklevel=3)

    def _scale(self, group: dict, p: torch.Tensor) -> float | torch.Tensor:
        """s of the proximal step lr·λ·s for ``p`` (1 where the optimizer's metric is unknown)."""
        if self._metric is None:
            return 1.0
        s = self._metric(group, self.optimizer.state.get(p, {}))
        if s is None:  # e.g. a subclass that keeps other state: say so, take the plain step
            self._warn_plain()
            return 1.0
        return s

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
        flat = self.penalty.direction([p for _, mine in self._groups for p in mine])  # one γ̄ over all
        signs, start = [], 0
        for _, mine in self._groups:
            signs.append(flat[start:start + len(mine)])
            start += len(mine)
        fresh = [[optimizer.state.get(p, {}).get("momentum_buffer") is None for p in mine] for _, mine in self._groups]
        self._pending = (lam, signs, fresh)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        if _skipped(optimizer):  # a fused optimizer left γ and its state as they were: so do we
            self._pending = None
            return
        self.taken += 1
        if self._pending is None:
            return
        lam, signs, fresh = self._pending
        self._pending = None
        for (group, mine), sign, first in zip(self._groups, signs, fresh):
            stepped = [i for i, p in enumerate(mine) if p.grad is not None]  # no gradient, no update
            if not stepped:
                continue
            params, dirs = [mine[i] for i in stepped], [sign[i] for i in stepped]
            if self.mode == "proximal":
                self._proximal(group, params, dirs, lam)
            else:
                self._sgd_extra(optimizer, group, params, dirs, [first[i] for i in stepped], lam)
            self.penalty.project(params)

    def _proximal(self, group: dict, params: list[torch.Tensor], dirs: list[torch.Tensor], lam: float) -> None:
        """The proximal step of lr·λ·R in the optimizer's metric (module docstring), one γ at a time."""
        for p, d in zip(params, dirs):
            amount = group["lr"] * lam * self._scale(group, p)
            if self.penalty.kind == "l1":
                _soft_threshold(p, amount)
            else:  # decoupled: polarization has no closed-form proximal step
                p.sub_(d * amount)

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


L1Step = SparsityStep  # the default penalty is L1


def attach_sparsity(optimizer: torch.optim.Optimizer, model: nn.Module, lam: float | Callable[[], float],
                    kind: str = "l1", mode: str = "auto", t: float = POLARIZATION_T, bound: float = 1.0) -> SparsityStep:
    """Penalise every BatchNorm γ of ``model`` with λ·R(γ) (``kind``: l1 | polarization) at each step."""
    return SparsityStep(optimizer, bn_gammas(model), lam, mode, make_penalty(kind, t, bound))


def attach_l1(optimizer: torch.optim.Optimizer, model: nn.Module, lam: float | Callable[[], float],
              mode: str = "auto") -> SparsityStep:
    """Penalise every BatchNorm γ of ``model`` with λ·|γ| at each ``optimizer.step()``; see ``SparsityStep``.

    Example (a hand-written loop)::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        slimnet.attach_l1(opt, model, lam=1e-4)
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """
    return SparsityStep(optimizer, bn_gammas(model), lam, mode)


@torch.no_grad()
def init_gammas(model: nn.Module, value: float) -> None:
    """Set every trainable γ to ``value`` (0.5 in Liu et al. 2017: a smaller start lets L1 reach zero sooner);
    a frozen γ (``requires_grad=False``: a detector's frozen stages) keeps its loaded value."""
    for gamma in bn_gammas(model):
        if gamma.requires_grad:
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
