"""A λ that finds itself: drive a target share of BatchNorm γ below ε by the end of the sparse phase.

λ must otherwise be tuned per model and epoch budget (1e-4, the paper's, leaves nothing prunable in a
10-epoch run of the default model; 2e-3 destroys capacity), and a user learns whether it was right only
after the sparse phase. The controlled quantity is the ``target``-quantile of |γ|: the share below ε
reaches ``target`` exactly when that quantile falls below ε. After every optimizer step it is compared
with a schedule that falls geometrically from its first value to ε/2 over the first ``ramp`` of the
sparse phase and then holds, and log λ moves by ``rate``·error (error = log(quantile / scheduled),
clipped to ±1), with ``rate`` set so that a full error held over a quarter of the ramp changes λ
100-fold, whatever the number of steps. λ stays within [λ₀/``span``, λ₀·``span``] of the configured λ₀,
since a γ oscillating around 0 under a large subgradient step may never read below ε and must not drive
λ up without end. A multiplicative rule needs no scale for λ: it starts from the configured λ and
follows the model.

Why a quantile and not the share below ε itself: the share stays 0 until the bulk of γ crosses ε, so a
controller watching it keeps raising λ for epochs and then overshoots (measured on the default model at a
quarter scale: λ rose to 60-80× its start and 56-58% of γ ended at zero for a target of 45%). The
quantile moves as soon as λ does.
"""

from __future__ import annotations

import math

import torch


class LamController:
    """Args:
        target: share of γ to bring below ``eps`` (in (0, 1)).
        lam: the starting λ (> 0).
        total_steps: optimizer steps in the sparse phase.
        eps: what counts as "zero" (|γ| < eps).
        ramp: the share of the sparse phase over which the wanted share rises to ``target``.
        span: how far λ may move from the configured value, either way.
    """

    def __init__(self, target: float, lam: float, total_steps: int, eps: float = 1e-2, ramp: float = 0.75,
                 span: float = 1000.0):
        if not 0 < target < 1:
            raise ValueError(f"sparsity target={target} must be in (0, 1): the share of BatchNorm channels to "
                             "drive below eps by the prune epoch")
        if not lam > 0:
            raise ValueError(f"the λ controller starts from sparsity.lam > 0, got {lam}")
        self.target, self.lam, self.lam0, self.eps = target, float(lam), float(lam), eps
        self.total_steps, self.ramp, self.span = max(int(total_steps), 1), ramp, span
        self.rate = math.log(100.0) / max(1.0, 0.25 * ramp * self.total_steps)
        self.step = 0
        self.share = 0.0
        self.start: float | None = None  # the target-quantile of |γ| at the first step

    def wanted(self, step: int) -> float:
        """The scheduled target-quantile of |γ|: geometric from its first value down to ε/2, then held."""
        goal = self.eps / 2
        if self.start is None or self.start <= goal:
            return goal
        return self.start * (goal / self.start) ** min(1.0, step / (self.ramp * self.total_steps))

    @torch.no_grad()
    def update(self, gammas: list[torch.Tensor]) -> float:
        """Measure |γ| after one more step and return the λ for the next."""
        self.step += 1
        flat = torch.cat([g.detach().abs().reshape(-1).float() for g in gammas])
        self.share = float((flat < self.eps).float().mean())
        k = min(len(flat), max(1, math.ceil(self.target * len(flat))))
        quantile = max(float(flat.kthvalue(k).values), 1e-12)
        if self.start is None:
            self.start = quantile
        error = max(-1.0, min(1.0, math.log(quantile / self.wanted(self.step))))
        self.lam = min(self.lam0 * self.span, max(self.lam0 / self.span, self.lam * math.exp(self.rate * error)))
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "step": self.step, "share": self.share, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.step, self.share = state["lam"], state["step"], state.get("share", 0.0)
        self.start = state.get("start")
