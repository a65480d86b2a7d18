"""``Sparsity``: the γ penalty of a whole training run, inside any loop, with no framework imported.

What an adapter calls (Lightning's ``SparsityCallback`` today):

    sparse = Sparsity(lam=1e-4, until_epoch=8)
    sparse.prepare(net, fresh=True)                    # before training: γ to penalise, gamma_init
    sparse.start(steps_per_epoch)                      # the λ controller, when a target is set
    sparse.attach(net, optimizers)                     # again whenever ``needs_attach(optimizers)``
    sparse.after_step(epoch)                           # after each optimizer step: the controller
    entry = sparse.end_epoch(net, epoch)               # λ and γ statistics of the epoch, kept in history
    state = sparse.state_dict(); sparse.load_state_dict(state)

The step itself rides on each optimizer's hooks (``slimnet.sparsity.SparsityStep``), so it is exact under
clipping, accumulation and AMP whatever the loop.
"""

from __future__ import annotations

import math

from torch import nn

from slimnet.sparsity.controller import LamController
from slimnet.sparsity.step import (
    KINDS,
    MODES,
    POLARIZATION_T,
    SparsityStep,
    bn_gammas,
    gamma_stats,
    init_gammas,
    make_penalty,
)


class Sparsity:
    """λ·R(γ) on every trainable BatchNorm γ of a network, epoch by epoch (see ``SparsityCallback``).

    Args: as ``SparsityCallback`` (``lam``, ``until_epoch``, ``lam_after``, ``mode``, ``gamma_init``,
    ``kind``, ``t``, ``bound``, ``target``, ``eps``); ``where``: the name errors start with.
    """

    def __init__(self, lam: float, until_epoch: int | None = None, lam_after: float = 0.0, mode: str = "auto",
                 gamma_init: float | None = None, kind: str = "l1", t: float = POLARIZATION_T, bound: float = 1.0,
                 target: float | None = None, eps: float = 1e-2, where: str = "Sparsity"):
        for name, value in (("lam", lam), ("lam_after", lam_after)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{where}: {name}={value!r} must be a finite number >= 0")
        if mode not in MODES:
            raise ValueError(f"{where}: mode={mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if until_epoch is not None and until_epoch < 0:
            raise ValueError(f"{where}: until_epoch={until_epoch} must be >= 0 or None")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}")
        if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
            raise ValueError(f"{where}: target={target!r} must be in (0, 1) (a share of BatchNorm channels)")
        if target is not None and not lam > 0:
            raise ValueError(f"{where}: target= needs a starting lam > 0")
        self.where, self.penalty = where, make_penalty(kind, t, bound)
        if target is not None and mode == "auto":
            mode = "proximal"  # the controller counts γ at (near) zero: the proximal step puts them at exactly 0
        self.kind, self.target, self.eps, self.mode, self.gamma_init = kind, target, eps, mode, gamma_init
        self.lam, self.until_epoch, self.lam_after = float(lam), until_epoch, float(lam_after)
        self.controller: LamController | None = None
        self.history: list[dict] = []  # per epoch: λ and the γ statistics (frac_small = share below eps)
        self.epoch = 0
        self._controller_state: dict | None = None
        self._steps: list[SparsityStep] = []
        self._hooked: list[tuple[int, ...]] = []
        self._counted = 0  # optimizer updates the controller has seen

    # -- λ ------------------------------------------------------------------------------------------
    def sparse(self, epoch: int) -> bool:
        return self.until_epoch is None or epoch < self.until_epoch

    def current_lam(self) -> float:
        if not self.sparse(self.epoch):
            return self.lam_after
        return self.controller.lam if self.controller is not None else self.lam

    # -- before training ----------------------------------------------------------------------------
    def prepare(self, net: nn.Module, fresh: bool, name: str) -> None:
        """Fail now if ``net`` has nothing to penalise; on a fresh start set γ to ``gamma_init``."""
        if not [g for g in bn_gammas(net) if g.requires_grad]:
            frozen = sorted({type(m).__name__ for m in net.modules() if "FrozenBatchNorm" in type(m).__name__})
            hint = (f" (it has {', '.join(frozen)}: convert it with slimnet.sparsity.norms.unfreeze_batchnorm first)"
                    if frozen else " (no BatchNorm, or every γ is frozen)")
            raise ValueError(f"{self.where}: {name} has no trainable BatchNorm γ to penalise{hint}")
        if self.gamma_init is not None and fresh:
            init_gammas(net, self.gamma_init)

    def start(self, steps_per_epoch: float, max_epochs: int) -> None:
        """The λ controller over the sparse phase's optimizer steps (when a target is set)."""
        if self.target is not None and self.controller is None:
            epochs = self.until_epoch if self.until_epoch is not None else max_epochs
            self.controller = LamController(self.target, self.lam, round(steps_per_epoch * epochs), eps=self.eps)
            if self._controller_state:
                self.controller.load_state_dict(self._controller_state)

    # -- the optimizers -----------------------------------------------------------------------------
    def needs_attach(self, optimizers) -> bool:
        """Whether the optimizers were rebuilt or re-pointed (a cut) since the step was hooked on."""
        return _holding(optimizers) != self._hooked

    def attach(self, net: nn.Module, optimizers) -> int:
        """Hook the step onto every optimizer holding some γ (each γ on the one that owns it); returns how
        many trainable γ no optimizer holds (they get no step)."""
        self.detach()
        gammas = [g for g in bn_gammas(net) if g.requires_grad]
        owned: set[int] = set()
        for optimizer in optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [g for g in gammas if id(g) in held and id(g) not in owned]
            if mine:
                owned.update(id(g) for g in mine)
                self._steps.append(SparsityStep(optimizer, mine, self.current_lam, self.mode, self.penalty))
        self._hooked = _holding(optimizers)
        if not self._steps and gammas and (self.lam or self.lam_after):
            raise ValueError(f"{self.where}: no optimizer holds the BatchNorm γ; include them in the parameters "
                             "the optimizer is built over")
        return len(gammas) - len(owned)

    def detach(self) -> None:
        for step in self._steps:
            step.remove()
        self._steps, self._hooked, self._counted = [], [], 0

    def after_step(self) -> None:
        """After an optimizer step: the controller reads |γ|, once per update the optimizer really made
        (an AMP overflow skips the update, and the controller with it)."""
        taken = sum(step.taken for step in self._steps)
        if self.controller is None or not self.sparse(self.epoch) or taken == self._counted:
            return
        self._counted = taken
        self.controller.update([g for step in self._steps for _, mine in step._groups for g in mine])

    # -- each epoch ---------------------------------------------------------------------------------
    def end_epoch(self, net: nn.Module) -> dict:
        """λ and the γ statistics the epoch ended with, appended to ``history``."""
        entry = {"epoch": self.epoch, "lam": self.current_lam(), **gamma_stats(net, small=self.eps)}
        self.history.append(entry)
        return entry

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"lam": self.lam, "until_epoch": self.until_epoch, "lam_after": self.lam_after, "kind": self.kind,
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self._controller_state = state.get("controller")  # a resumed run goes on with the λ it had
        self.history = list(state.get("history", []))


def _holding(optimizers) -> list[tuple[int, ...]]:
    """Which optimizers hold which parameters: a cut either rebuilds the optimizers or points the same
    ones at new parameters, and either way the step must be hooked onto the new γ."""
    return [(id(o), *(id(p) for group in o.param_groups for p in group["params"])) for o in optimizers]
