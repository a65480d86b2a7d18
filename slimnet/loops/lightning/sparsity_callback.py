"""``SparsityCallback``: Network Slimming's sparsity training in any LightningModule.

It needs nothing from the module: it finds the BatchNorm γ of the module (or of the sub-module you
name), hooks the L1 step onto whatever optimizers the module's own ``configure_optimizers`` built
(see ``slimnet.sparsity.step``), and hooks it again whenever they are rebuilt (after a cut).
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from slimnet.core.sparsity import Sparsity
from slimnet.core.submodule import resolve_submodule
from slimnet.sparsity.step import POLARIZATION_T

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
                 log_stats: bool = True, kind: str = "l1", t: float = POLARIZATION_T, bound: float = 1.0,
                 target: float | None = None, eps: float = 1e-2):
        self.core = Sparsity(lam, until_epoch, lam_after, mode, gamma_init, kind, t, bound, target, eps,
                             where="SparsityCallback")
        self.module, self.log_stats = module, log_stats

    # what the core holds, under the names users and the run's report read
    lam = property(lambda self: self.core.lam)
    until_epoch = property(lambda self: self.core.until_epoch)
    lam_after = property(lambda self: self.core.lam_after)
    kind = property(lambda self: self.core.kind)
    target = property(lambda self: self.core.target)
    eps = property(lambda self: self.core.eps)
    mode = property(lambda self: self.core.mode)
    penalty = property(lambda self: self.core.penalty)
    controller = property(lambda self: self.core.controller)
    history = property(lambda self: self.core.history)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    def current_lam(self) -> float:
        return self.core.current_lam()

    def _net(self, pl_module: pl.LightningModule):
        return resolve_submodule(pl_module, self.module, "SparsityCallback")

    # -- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.core.prepare(self._net(pl_module), fresh=trainer.ckpt_path is None,
                              name=self.module or type(pl_module).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.epoch = trainer.current_epoch
        self.core.start(trainer.estimated_stepping_batches / max(trainer.max_epochs, 1), trainer.max_epochs)
        self._attach(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.core.needs_attach(trainer.optimizers):  # rebuilt or re-pointed, e.g. after a cut
            self._attach(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.core.after_step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.core.detach()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        entry = self.core.end_epoch(self._net(pl_module))
        if self.log_stats:
            stats = {k: v for k, v in entry.items() if k not in ("epoch", "lam")}
            pl_module.log_dict({f"sparsity/{k}": v for k, v in stats.items()}, sync_dist=False)
            pl_module.log("sparsity/lam", entry["lam"])  # the controller's λ, when it drives it

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = self.core.attach(self._net(pl_module), trainer.optimizers)
        if missing:
            log.warning("SparsityCallback: %d BatchNorm γ are in no optimizer (configure_optimizers leaves them "
                        "out): they get no sparsity step", missing)

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.core.load_state_dict(state_dict)
