"""``SparsityCallback``: Network Slimming's sparsity training in any LightningModule.

It needs nothing from the module: it finds the BatchNorm γ of the module (or of the sub-module you
name), hooks the L1 step onto whatever optimizers the module's own ``configure_optimizers`` built
(see ``slimnet.sparsity``), and hooks it again whenever they are rebuilt (after a cut).
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from slimnet.sparsity import MODES, L1Step, bn_gammas, gamma_stats, init_gammas
from slimnet.submodule import resolve_submodule

log = logging.getLogger(__name__)


class SparsityCallback(Callback):
    """Penalise λ·Σ|γ| over every BatchNorm γ, at every optimizer step, in any LightningModule.

    The step is taken through the optimizer's own step hooks, so it is exact under gradient accumulation,
    gradient clipping (which never rescales it), AMP (skipped with the step on an overflow) and fused
    optimizers: for ``torch.optim.SGD`` it is the paper's λ·sign(γ) added to the gradient, momentum and
    Nesterov included; for adaptive optimizers (Adam, AdamW, …), where that subgradient would be divided
    by √v, it is the proximal step γ ← sign(γ)·max(|γ| − lr·λ, 0) after the update.

    BatchNorm layers kept in eval mode during training (``norm_eval``) are penalised like any other:
    their γ is still a trained parameter. Frozen γ (``requires_grad=False``) and ``FrozenBatchNorm2d``
    are not (convert the latter first).

    Args:
        lam: λ. Liu et al. 2017: 1e-4 for VGG, 1e-5 for ResNet/DenseNet, over 160 epochs; fewer epochs
            need more.
        until_epoch: λ applies in epochs ``[0, until_epoch)`` and ``lam_after`` from then on (typically
            the ``SlimmingCallback``'s epoch); None: all epochs.
        lam_after: λ after ``until_epoch`` (0: plain fine-tuning, as in the paper).
        module: dotted name of the sub-module whose BatchNorm γ are penalised (``"backbone"``);
            None: the whole LightningModule.
        mode: ``"auto"`` (subgradient for SGD, proximal otherwise), ``"subgradient"`` or ``"proximal"``.
        gamma_init: set every γ to this when a fit starts from scratch (the paper uses 0.5); None leaves
            them. Never applied when resuming from a checkpoint.
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
                 log_stats: bool = True):
        for name, value in (("lam", lam), ("lam_after", lam_after)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"SparsityCallback: {name}={value!r} must be a finite number >= 0")
        if mode not in MODES:
            raise ValueError(f"SparsityCallback: mode={mode!r} is unknown; choose one of: {', '.join(MODES)}")
        if until_epoch is not None and until_epoch < 0:
            raise ValueError(f"SparsityCallback: until_epoch={until_epoch} must be >= 0 or None")
        self.lam, self.until_epoch, self.lam_after = float(lam), until_epoch, float(lam_after)
        self.module, self.mode, self.gamma_init, self.log_stats = module, mode, gamma_init, log_stats
        self._steps: list[L1Step] = []
        self._hooked: list[int] = []
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    def current_lam(self) -> float:
        epoch = self._trainer.current_epoch if self._trainer is not None else 0
        return self.lam if self.until_epoch is None or epoch < self.until_epoch else self.lam_after

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
        self._attach(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if [id(o) for o in trainer.optimizers] != self._hooked:  # rebuilt, e.g. after a cut
            self._attach(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._detach()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_stats:
            return
        stats = gamma_stats(resolve_submodule(pl_module, self.module, "SparsityCallback"))
        pl_module.log_dict({f"sparsity/{k}": v for k, v in stats.items()}, sync_dist=False)
        pl_module.log("sparsity/lam", self.current_lam())

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
                self._steps.append(L1Step(optimizer, mine, self.current_lam, self.mode))
        self._hooked = [id(o) for o in trainer.optimizers]
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
        return {"lam": self.lam, "until_epoch": self.until_epoch, "lam_after": self.lam_after}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # nothing changes during a fit; the saved values document the run
