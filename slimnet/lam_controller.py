"""A λ that finds itself: drive a target share of BatchNorm γ below ε by the end of the sparse phase.

λ must otherwise be tuned per model and epoch budget (1e-4, the paper's, leaves nothing prunable in a
10-epoch run of the default model; 2e-3 destroys capacity), and a user learns whether it was right only
after the sparse phase. Here the share of |γ| < ε is measured after every optimizer step and compared
with a schedule that rises linearly from 0 to ``target`` over the first ``ramp`` of the sparse phase and
then holds. log λ moves by ``rate``·error per step (error = (wanted − share)/target, clipped to ±1), with
``rate`` set so that a full error held over a quarter of the ramp changes λ 100-fold, whatever the
number of steps; λ stays within [λ₀/``span``, λ₀·``span``] of the configured λ₀, since a γ oscillating around
0 under a large subgradient step may never read below ε and must not drive λ up without end.
A multiplicative rule needs no scale for λ: it starts from the configured λ and follows the model.
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

    def wanted(self, step: int) -> float:
        return self.target * min(1.0, step / (self.ramp * self.total_steps))

    @torch.no_grad()
    def update(self, gammas: list[torch.Tensor]) -> float:
        """Measure the share below ε after one more step and return the λ for the next."""
        self.step += 1
        flat = torch.cat([g.detach().abs().reshape(-1) for g in gammas])
        self.share = float((flat < self.eps).float().mean())
        error = max(-1.0, min(1.0, (self.wanted(self.step) - self.share) / self.target))
        self.lam = min(self.lam0 * self.span, max(self.lam0 / self.span, self.lam * math.exp(self.rate * error)))
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "step": self.step, "share": self.share}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.step, self.share = state["lam"], state["step"], state.get("share", 0.0)
