"""``SparsityCallback``: Network Slimming's sparsity training in any LightningModule.

It needs nothing from the module: it finds the BatchNorm γ of the module (or of the sub-module you
name), hooks the L1 step onto whatever optimizers the module's own ``configure_optimizers`` built
(see ``slimnet.sparsity.step``), and hooks it again whenever they are rebuilt (after a cut).
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from slimnet.core.submodule import resolve_submodule
from slimnet.sparsity.controller import LamController
from slimnet.sparsity.step import (
    KINDS,
    MODES,
    SparsityStep,
    bn_gammas,
    gamma_stats,
    init_gammas,
    make_penalty,
)

log = logging.getLogger(__name__)


class SparsityCallback(Callback):
    """Penalise λ·R(γ) over every BatchNorm γ, at every optimizer step, in any LightningModule.

    R is the paper's L1 (``kind="l1"``) or the polarization regularizer (``kind="polarization"``,
    Zhuang et al. 2020), which splits γ into a cluster at 0 and one away from it.

    The step is taken through the optimizer's own step hooks, so it is exact under gradient accumulation,
    gradient clipping (which never rescales it), AMP (skipped with the step on an overflow, also when a
    fused optimizer is stepped with ``found_inf`` set) and fused optimizers: for ``torch.optim.SGD`` it is the paper's λ·sign(γ) added
    to the gradient, momentum and Nesterov included; for Adam, AdamW, NAdam, RAdam and Adamax, where that
    subgradient would be divided by √v, it is the proximal step in the optimizer's own metric after the
    update, γ ← sign(γ)·max(|γ| − lr·λ/(√v̂ + ε), 0) for Adam(W). Either way λ is a gradient: a γ ends at
    (SGD: around) 0 when its momentum-averaged loss gradient stays below λ (``slimnet.sparsity.step``;
    docs/sparsity.md measures it). Other optimizers get the plain step lr·λ, with a warning.

    BatchNorm layers kept in eval mode during training (``norm_eval``) are penalised like any other:
    their γ is still a trained parameter. Frozen γ (``requires_grad=False``) and ``FrozenBatchNorm2d``
    are not (convert the latter first).

    Args:
        lam: λ, in units of ∂L/∂γ. Liu et al. 2017: 1e-4 for VGG, 1e-5 for ResNet/DenseNet, over 160
            epochs of SGD; fewer epochs need more (the default model: 1e-3 over 8 epochs of SGD; with
            AdamW at lr 1e-3, 3e-3 to 1e-2 over 344 steps, docs/sparsity.md).
        until_epoch: λ applies in epochs ``[0, until_epoch)`` and ``lam_after`` from then on (typically
            the ``SlimmingCallback``'s epoch); None: all epochs.
        lam_after: λ after ``until_epoch`` (0: plain fine-tuning, as in the paper).
        module: dotted name of the sub-module whose BatchNorm γ are penalised (``"backbone"``);
            None: the whole LightningModule.
        mode: ``"auto"`` (subgradient for SGD, proximal otherwise; proximal for every optimizer when
            ``target`` is set), ``"subgradient"`` or ``"proximal"``.
        gamma_init: set every γ to this when a fit starts from scratch (the paper uses 0.5); None leaves
            them. Never applied when resuming from a checkpoint.
        kind: ``"l1"`` or ``"polarization"``.
        t, bound: polarization's weight of the L1 term and the upper clamp of γ (ignored for L1). t = 1.4:
            the reference code uses 1.4–1.5 for CIFAR networks (ResNet-56 1.4, VGG-16 1.5) and 1.2 for
            ImageNet ResNet-50 (polarizationpruning/PolarizationPruning); bound = 1 is its clamp.
        target: a share of BatchNorm channels in (0, 1) to drive below ``eps`` by ``until_epoch``: λ is
            then adjusted after every step, starting from ``lam`` (see ``slimnet.sparsity.controller``);
            None keeps λ fixed. The controller counts γ that are (near) zero, so ``mode="auto"`` takes
            the proximal step then (under SGD too, in SGD's metric lr·λ): it sets γ exactly to 0, while
            the paper's subgradient leaves them oscillating around 0 by about lr·λ/(1 − momentum),
            which can stay above ``eps`` for ever.
        eps: what counts as a zero γ for ``target`` and for the logged share.
        log_stats: log ``sparsity/lam``, ``sparsity/l1``, ``sparsity/mean`` and ``sparsity/frac_small``
            (share of |γ| < 0.01) every epoch.

    Raises:
        ValueError: a negative or non-finite λ, an unknown mode; at fit start, a ``module`` the
            LightningModule does not have, or one with no trainable BatchNorm γ.

    Example::

        trainer = pl.Trainer(max_epochs=12, callbacks=[
            slimnet.SparsityCallback(lam=1e-4, until_epoch=8),
            slimnet.SlimmingCallback(epoch=8, percent=0.5)])
    """

    def __init__(self, lam: float, until_epoch: int | None = None, lam_after: float = 0.0,
                 module: str | None = None, mode: str = "auto", gamma_init: float | None = None,
                 log_stats: bool = True, kind: str = "l1", t: float = 1.4, bound: float = 1.0,
                 target: float | None = None, eps: float = 1e-2):
        for name, value in (("lam", lam), ("lam_after", lam_after)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"SparsityCallback: {name}={value!r} must be a finite number >= 0")
        if mode not in MODES:
            raise ValueError(f"SparsityCallback: mode={mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if until_epoch is not None and until_epoch < 0:
            raise ValueError(f"SparsityCallback: until_epoch={until_epoch} must be >= 0 or None")
        if kind not in KINDS:
            raise ValueError(f"SparsityCallback: kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}")
        if target is not None and not (isinstance(target, (int, float)) and 0 < target < 1):
            raise ValueError(f"SparsityCallback: target={target!r} must be in (0, 1) (a share of BatchNorm channels)")
        if target is not None and not lam > 0:
            raise ValueError("SparsityCallback: target= needs a starting lam > 0")
        self.penalty = make_penalty(kind, t, bound)
        if target is not None and mode == "auto":
            mode = "proximal"
        self.kind, self.target, self.eps = kind, target, eps
        self.controller: LamController | None = None
        self.lam, self.until_epoch, self.lam_after = float(lam), until_epoch, float(lam_after)
        self.module, self.mode, self.gamma_init, self.log_stats = module, mode, gamma_init, log_stats
        self._steps: list[SparsityStep] = []
        self._hooked: list[tuple[int, ...]] = []
        self._trainer: pl.Trainer | None = None
        self._controller_state: dict | None = None
        self.history: list[dict] = []  # per epoch: λ and the γ statistics (frac_small = share below eps)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    def current_lam(self) -> float:
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        if self.until_epoch is not None and epoch >= self.until_epoch:
            return self.lam_after
        return self.controller.lam if self.controller is not None else self.lam

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        target = resolve_submodule(pl_module, self.module, "SparsityCallback")
        gammas = [g for g in bn_gammas(target) if g.requires_grad]
        if not gammas:
            frozen = sorted({type(m).__name__ for m in target.modules() if "FrozenBatchNorm" in type(m).__name__})
            hint = (f" (it has {', '.join(frozen)}: convert it with slimnet.unfreeze_batchnorm first)" if frozen
                    else " (no BatchNorm, or every γ is frozen)")
            raise ValueError(f"SparsityCallback: {self.module or type(pl_module).__name__} has no trainable "
                             f"BatchNorm γ to penalise{hint}")
        if self.gamma_init is not None and trainer.ckpt_path is None:
            init_gammas(target, self.gamma_init)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self.target is not None and self.controller is None:
            epochs = self.until_epoch if self.until_epoch is not None else trainer.max_epochs
            per_epoch = trainer.estimated_stepping_batches / max(trainer.max_epochs, 1)
            self.controller = LamController(self.target, self.lam, round(per_epoch * epochs), eps=self.eps)
            if self._controller_state:
                self.controller.load_state_dict(self._controller_state)
        self._attach(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sparse = self.until_epoch is None or trainer.current_epoch < self.until_epoch
        if self.controller is not None and sparse and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.controller.update([g for step in self._steps for _, mine in step._groups for g in mine])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if _holding(trainer.optimizers) != self._hooked:  # rebuilt or re-pointed, e.g. after a cut
            self._attach(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._detach()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = gamma_stats(resolve_submodule(pl_module, self.module, "SparsityCallback"), small=self.eps)
        lam = self.current_lam()  # the λ this epoch ended with (the controller's, when it drives it)
        self.history.append({"epoch": trainer.current_epoch, "lam": lam, **stats})
        if self.log_stats:
            pl_module.log_dict({f"sparsity/{k}": v for k, v in stats.items()}, sync_dist=False)
            pl_module.log("sparsity/lam", lam)  # the controller's λ, when it drives it

    # -- work ---------------------------------------------------------------------------------------
    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hook the L1 step onto every optimizer holding some of the γ (each γ on the one that owns it)."""
        self._detach()
        gammas = [g for g in bn_gammas(resolve_submodule(pl_module, self.module, "SparsityCallback"))
                  if g.requires_grad]
        owned: set[int] = set()
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [g for g in gammas if id(g) in held and id(g) not in owned]
            if mine:
                owned.update(id(g) for g in mine)
                self._steps.append(SparsityStep(optimizer, mine, self.current_lam, self.mode, self.penalty))
        self._hooked = _holding(trainer.optimizers)
        missing = len(gammas) - len(owned)
        if missing:
            log.warning("SparsityCallback: %d of %d BatchNorm γ are in no optimizer (configure_optimizers "
                        "leaves them out): they get no sparsity step", missing, len(gammas))
        if not self._steps and gammas and (self.lam or self.lam_after):
            raise ValueError("SparsityCallback: no optimizer holds the BatchNorm γ; include them in the "
                             "parameters that configure_optimizers passes to the optimizer")

    def _detach(self) -> None:
        for step in self._steps:
            step.remove()
        self._steps, self._hooked = [], []

    def state_dict(self) -> dict:
        return {"lam": self.lam, "until_epoch": self.until_epoch, "lam_after": self.lam_after, "kind": self.kind,
                "controller": self.controller.state_dict() if self.controller is not None else None,
                "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self._controller_state = state_dict.get("controller")  # a resumed run goes on with the λ it had
        self.history = list(state_dict.get("history", []))


def _holding(optimizers) -> list[tuple[int, ...]]:
    """Which optimizers hold which parameters: a cut either rebuilds the optimizers or points the same
    ones at new parameters, and either way the step must be hooked onto the new γ."""
    return [(id(o), *(id(p) for group in o.param_groups for p in group["params"])) for o in optimizers]
