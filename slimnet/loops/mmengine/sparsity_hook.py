"""``SlimnetSparsityHook``: the γ penalty of Network Slimming inside an mmengine ``Runner``.

A thin translation of the runner's events into ``slimnet.core.Sparsity`` calls. The step rides on the
torch optimizer's own step hooks (under the runner's ``OptimWrapper``), so it is taken once per real
update, after gradient accumulation (``accumulative_counts``), clipping (``clip_grad``) and the
``AmpOptimWrapper``'s unscaling, and skipped when the loss scaler skips the update on an overflow.
"""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from slimnet.core import Sparsity
from slimnet.loops.mmengine.runner_access import (
    accumulation,
    by_iteration,
    model_of,
    optimizers_of,
    slimnet_meta,
    store_meta,
)
from slimnet.loops.mmengine.trunk import check_scope, penalised
from slimnet.sparsity.step import POLARIZATION_T

WHO = "SlimnetSparsityHook"


@HOOKS.register_module()
class SlimnetSparsityHook(Hook):
    """λ·R(γ) on every trainable BatchNorm γ of the model (or of its ``scope``), at every optimizer update.

    Frozen γ (``frozen_stages``: ``requires_grad=False``) get no step; norms kept in eval mode
    (``norm_eval=True``) are penalised like the others: their γ is still trained.

    Args:
        lam: λ, in units of ∂L/∂γ (see ``slimnet.SparsityCallback``; Liu et al. 2017: 1e-4 for VGG, 1e-5
            for ResNet over 160 epochs of SGD; fewer epochs need more).
        until_epoch: λ applies in epochs ``[0, until_epoch)``, ``lam_after`` from then on (typically the
            slimming hook's ``epoch``); None: all of training.
        lam_after: λ after ``until_epoch`` / ``until_iter`` (0: plain fine-tuning, as in the paper).
        until_iter: the same in iterations, for an ``IterBasedTrainLoop`` (mmseg's default).
        scope: ``"all"``, ``"backbone"`` or ``"backbone+neck"``: whose γ are penalised (give the slimming
            hook the same).
        mode, gamma_init, kind, t, bound, target, eps: as ``slimnet.SparsityCallback``. ``gamma_init``
            is applied only when training starts from nothing (no ``load_from``, no resume); leave it
            None over pretrained weights.
        log_stats: log λ and the γ statistics (L1, mean, share below ``eps``) every epoch (every
            ``stats_interval`` iterations when training by iterations) to the runner's logger and
            visualizer.
        stats_interval: iterations between statistics when training by iterations.

    Raises:
        ValueError: when the hook is built (before training), a negative λ, an unknown ``mode``/``kind``/
            ``scope``, both ``until_epoch`` and ``until_iter``; before the first iteration, a model (or
            scope) with no trainable γ, an optimizer holding none of them, or ``until_epoch`` on a runner
            that trains by iterations.

    Example (config)::

        custom_imports = dict(imports=["slimnet.loops.mmengine"], allow_failed_imports=False)
        custom_hooks = [dict(type="SlimnetSparsityHook", lam=1e-4, until_epoch=8, scope="backbone")]
    """

    priority = "NORMAL"

    def __init__(self, lam: float, until_epoch: int | None = None, lam_after: float = 0.0, *,
                 until_iter: int | None = None, scope: str = "all", mode: str = "auto",
                 gamma_init: float | None = None, kind: str = "l1", t: float = POLARIZATION_T,
                 bound: float = 1.0, target: float | None = None, eps: float = 1e-2, log_stats: bool = True,
                 stats_interval: int = 500):
        if until_epoch is not None and until_iter is not None:
            raise ValueError(f"{WHO}: give until_epoch=… (training by epochs) or until_iter=… (by "
                             "iterations), not both")
        until = until_epoch if until_iter is None else until_iter
        self.core = Sparsity(lam, until, lam_after, mode, gamma_init, kind, t, bound, target, eps, where=WHO)
        self.scope = check_scope(scope, WHO)
        self.until_iter, self.log_stats = until_iter, log_stats
        self.stats_interval = max(int(stats_interval), 1)
        self.by_iter = until_iter is not None
        self._loaded = False  # a checkpoint was loaded (resume or load_from): never apply gamma_init

    lam = property(lambda self: self.core.lam)
    history = property(lambda self: self.core.history)

    def _net(self, runner):
        return penalised(model_of(runner), self.scope, WHO)

    # -- before training ------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        self._net(runner)  # a scope the model does not have fails now, in train, val and test runs alike

    def before_train(self, runner) -> None:
        iterations = by_iteration(runner)
        if self.core.until_epoch is not None and self.by_iter != iterations:
            unit, mine, other = ("iterations (IterBasedTrainLoop)", "until_iter", "until_epoch")
            if not iterations:
                unit, mine, other = "epochs", "until_epoch", "until_iter"
            raise ValueError(f"{WHO}: the runner trains by {unit}: give {mine}=… instead of {other}=…")
        self.by_iter = self.by_iter or iterations
        net = self._net(runner)
        self.core.prepare(net, fresh=not self._loaded, name=self.scope if self.scope != "all" else
                          type(model_of(runner)).__name__)
        per_update = 1 / accumulation(runner.optim_wrapper)
        if self.by_iter:
            self.core.start(per_update, runner.max_iters)
        else:
            self.core.start(len(runner.train_dataloader) * per_update, runner.max_epochs)
        self.core.epoch = runner.iter if self.by_iter else runner.epoch
        self._attach(runner)

    def _attach(self, runner) -> None:
        missing = self.core.attach(self._net(runner), optimizers_of(runner.optim_wrapper))
        if missing:
            runner.logger.warning(f"{WHO}: {missing} BatchNorm γ are in no optimizer (the optimizer's "
                                  "paramwise config leaves them out): they get no sparsity step")

    # -- training -------------------------------------------------------------------------------------
    def before_train_epoch(self, runner) -> None:
        if not self.by_iter:
            self.core.epoch = runner.epoch

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self.by_iter:
            self.core.epoch = runner.iter
        if self.core.needs_attach(optimizers_of(runner.optim_wrapper)):  # re-pointed by a cut
            self._attach(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.core.after_step()
        if self.by_iter and (runner.iter + 1) % self.stats_interval == 0:
            self._end_period(runner, runner.iter + 1)

    def after_train_epoch(self, runner) -> None:
        if not self.by_iter:
            self._end_period(runner, runner.iter)

    def after_train(self, runner) -> None:
        self.core.detach()

    def _end_period(self, runner, step: int) -> None:
        entry = self.core.end_epoch(self._net(runner))
        if not self.log_stats:
            return
        unit = "iter" if self.by_iter else "epoch"
        stats = {f"sparsity/{k}": v for k, v in entry.items() if k != "epoch"}
        text = ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
        runner.logger.info(f"{WHO}: {unit} {entry['epoch']} {text}")
        runner.visualizer.add_scalars(stats, step=step)

    # -- checkpoints ----------------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        store_meta(checkpoint, "sparsity", self.core.state_dict())

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._loaded = True
        state = slimnet_meta(checkpoint).get("sparsity")
        if state:
            self.core.load_state_dict(state)
