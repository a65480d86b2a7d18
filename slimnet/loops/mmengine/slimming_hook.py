"""``SlimnetSlimmingHook``: cut an mmengine model for real at an epoch (or iteration), and keep training.

A thin translation of the runner's events into ``slimnet.core.Slimming`` calls:

* ``before_run``: the scope exists in the model (train, val and test runs alike);
* ``after_load_checkpoint`` (mmengine calls it *before* the state dict loads): a cut checkpoint's plan
  is replayed on the freshly built model, and the optimizer, the DDP wrapper and EMA copies follow it;
* ``before_train``: the epoch lies inside training; one training sample through the model's
  ``data_preprocessor`` is the trace's input, and a model with nothing to cut fails now;
* the epoch before the cut: the inputs the backbone (or model) receives are summarised for β folding;
* ``before_train_epoch`` at ``epoch`` (``before_train_iter`` at ``iter``): the cut. The runner's own
  optimizers are pointed at the cut parameters in place with the surviving channels' state, so the
  param schedulers stepping them go on where they were;
* ``before_save_checkpoint``: the plan into ``checkpoint["meta"]["slimnet"]``;
* ``after_train``: the cut model as ``pruned.pt`` (``slimnet.load_pruned``) in the work dir.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from mmengine.dist import broadcast_object_list, get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from slimnet.core import Slimming
from slimnet.engine.artifact import save_pruned
from slimnet.engine.plan import PrunePlan
from slimnet.locate import locate
from slimnet.loops.mmengine.checkpoint import replay_checkpoint
from slimnet.loops.mmengine.runner_access import (
    by_iteration,
    example_input,
    model_of,
    optimizers_of,
    refresh_ema,
    rewrap,
    slimnet_meta,
    store_meta,
)
from slimnet.loops.mmengine.trunk import check_scope, traced

WHO = "SlimnetSlimmingHook"
FOLD_ITERS = 64  # training by iterations: the statistics β folding needs are gathered over the last
                 # iterations before the cut (at most slimnet.core.slimming.FOLD_SAMPLES samples)
SUMMARY = ("epoch", "iter", "policy", "scope", "threshold", "flops_before", "flops_after", "params_before",
           "params_after", "surgery_seconds")


@HOOKS.register_module()
class SlimnetSlimmingHook(Hook):
    """Cut the model for real as epoch ``epoch`` (or iteration ``iter``) starts, then let training go on.

    It ranks every BatchNorm channel in ``scope`` by |γ| across the whole scope, keeps those above
    ``thresh`` (or prunes the weakest ``percent``, or cuts down to ``target_flops`` of the FLOPs), never
    fewer than ``min_channels`` per layer, and removes the rest from the producing convs, the norms and
    every layer reading them, the neck's input convs included when the backbone's outputs lose channels.
    The heads are never cut. Norms with frozen γ (``frozen_stages``) were never sparsity-trained: their
    groups are kept whole unless ``cut_frozen=True``; ``norm_eval`` and ``frozen_stages`` behave after
    the cut as before (the model's own ``train()`` still applies them).

    Args:
        epoch: epoch at whose start the cut happens (the sparse phase is ``[0, epoch)``).
        thresh / percent / target_flops: the policy, as ``slimnet.prune`` (thresh and target_flops win
            over percent).
        iter: the cut at this iteration instead, for an ``IterBasedTrainLoop``.
        scope: ``"all"`` (the model's ``mode="tensor"`` forward), ``"backbone"`` or ``"backbone+neck"``
            (see ``slimnet.loops.mmengine.trunk``).
        min_channels, round_to, fold_bias, carry_optimizer_state, cut_frozen: as ``slimnet.SlimmingCallback``.
        leaf_modules: module classes (or their dotted names) traced as black boxes.
        save_pruned: after training, write the cut model to ``<work_dir>/pruned.pt`` (``slimnet.load_pruned``
            reads it back with ``weights_only=True`` into a model built from the config).

    Raises:
        ValueError: when the hook is built, no policy or an invalid one, neither or both of ``epoch`` and
            ``iter``, an unknown ``scope``; before training, a scope the model lacks, a cut past the
            end of training, a runner that trains by the other unit, or a model with nothing to cut.
        slimnet.errors.NothingCutError: at the cut, a ``percent`` or ``target_flops`` that removes nothing.

    Example (config)::

        custom_imports = dict(imports=["slimnet.loops.mmengine"], allow_failed_imports=False)
        custom_hooks = [dict(type="SlimnetSparsityHook", lam=1e-4, until_epoch=8, scope="backbone"),
                        dict(type="SlimnetSlimmingHook", epoch=8, thresh=0.17, scope="backbone")]
    """

    priority = "VERY_HIGH"  # after_load_checkpoint cuts the model before EMAHook (49, 50) loads its copy

    def __init__(self, epoch: int | None = None, thresh: float | None = None, percent: float | None = None,
                 target_flops: float | None = None, *, iter: int | None = None, scope: str = "all",
                 min_channels: int = 1, round_to: int = 1, fold_bias: bool = True,
                 carry_optimizer_state: bool = True, cut_frozen: bool = False, leaf_modules=(),
                 save_pruned: bool = True):
        if (epoch is None) == (iter is None):
            raise ValueError(f"{WHO} needs epoch=… (the epoch the cut happens at) or iter=… (for an "
                             "IterBasedTrainLoop), exactly one")
        leaf_modules = tuple(locate(m) if isinstance(m, str) else m for m in leaf_modules)
        self.core = Slimming(epoch if iter is None else iter, thresh, percent, target_flops,
                             min_channels=min_channels, round_to=round_to, fold_bias=fold_bias,
                             carry_optimizer_state=carry_optimizer_state, cut_frozen=cut_frozen,
                             leaf_modules=leaf_modules, where=WHO)
        self.scope = check_scope(scope, WHO)
        self.by_iter, self.save_pruned = iter is not None, save_pruned
        self.report: dict | None = None
        self._inputs: tuple | None = None  # the traced module's example input, a batch of one

    done = property(lambda self: self.core.done)
    policy = property(lambda self: self.core.policy)

    @property
    def plan(self) -> PrunePlan | None:
        return self.core.plan

    @property
    def at(self) -> str:
        return f"{'iter' if self.by_iter else 'epoch'}={self.core.epoch}"

    def _traced(self, runner):
        return traced(model_of(runner), self.scope, WHO)

    # -- every run: the scope exists; a cut checkpoint loads at its widths -----------------------------
    def before_run(self, runner) -> None:
        self._traced(runner)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = slimnet_meta(checkpoint).get("slimming")
        if not state:
            return
        model = model_of(runner)
        if replay_checkpoint(model, checkpoint, runner.optim_wrapper):
            rewrap(runner)
            refresh_ema(runner, model)
            runner.logger.info(f"{WHO}: cut the model to the checkpoint's widths before its weights load")
        self.core.load_state_dict(state)
        self.report = state.get("report")

    # -- before training ----------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        iterations = by_iteration(runner)
        if iterations != self.by_iter:
            unit, other = ("iterations (IterBasedTrainLoop)", "iter") if iterations else ("epochs", "epoch")
            raise ValueError(f"{WHO}: the runner trains by {unit}: give {other}=… instead of "
                             f"{'epoch' if other == 'iter' else 'iter'}=…")
        if self.by_iter and self.core.epoch >= runner.max_iters:
            raise ValueError(f"{WHO}: iter={self.core.epoch} is not before the last iteration (max_iters="
                             f"{runner.max_iters}): the model would never be cut; lower it or train longer")
        if not self.by_iter:
            self.core.check(runner.max_epochs)
        if self.done:  # resumed (or loaded) after the cut
            return
        model = model_of(runner)
        net, within, _ = self._traced(runner)
        self.core.within = within
        self._inputs = (example_input(runner, model, WHO),)
        name = self.scope if self.scope != "all" else type(model).__name__
        self.core.check_cuttable(net, self._inputs, name)

    # -- the statistics β folding needs, over the inputs of the last epoch (iterations) before the cut -
    def _watch(self, runner) -> None:
        """Record what the traced module's input is in training (an mmengine model receives ``inputs=`` as
        a keyword; the core reads it either way)."""
        net, _, fed = self._traced(runner)
        self.core.record(net, fed)

    def before_train_epoch(self, runner) -> None:
        if self.by_iter:
            return
        if self._inputs is not None and self.core.records(runner.epoch, self._inputs):
            self._watch(runner)
        if self.core.due(runner.epoch):
            self._cut(runner)

    def after_train_epoch(self, runner) -> None:
        if not self.by_iter:
            self.core.stop(keep=True)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if not self.by_iter or self.done:
            return
        it, at = runner.iter, self.core.epoch
        if (self.core.fold_bias and not self.core.recording and self.core.fold_stats is None
                and max(at - FOLD_ITERS, 0) <= it < at):
            self._watch(runner)
        if self.core.due(it):
            self._cut(runner)  # the core keeps what was recorded up to here

    # -- the cut --------------------------------------------------------------------------------------
    def _cut(self, runner) -> None:
        model = model_of(runner)
        net, within, _ = self._traced(runner)
        self.core.within = within
        device = next(iter(model.parameters()), torch.empty(0)).device
        inputs = self._inputs if self._inputs is not None else (example_input(runner, model, WHO),)
        start = time.perf_counter()
        report, messages = self.core.cut(net, tuple(x.to(device) for x in inputs),
                                         optimizers_of(runner.optim_wrapper))
        seconds = time.perf_counter() - start
        for message in messages:
            runner.logger.warning(message)
        self._check_ranks_agree()
        rewrap(runner)
        refresh_ema(runner, model)
        self._inputs = None
        full = report.to_dict()
        self.report = {**{k: full[k] for k in SUMMARY if k in full}, "policy": self.policy,
                       "scope": self.scope, "epoch": runner.epoch, "iter": runner.iter,
                       "surgery_seconds": seconds, "channels": full.get("channels", {}), "warnings": messages}
        self._log_report(runner)

    def _check_ranks_agree(self) -> None:
        """Every rank cut the same channels (DDP keeps weights equal, so they must): verify, loudly."""
        if get_world_size() <= 1:
            return
        mine = [self.core.plan.to_json()]
        theirs = list(mine)
        broadcast_object_list(theirs, src=0)
        if theirs != mine:
            raise RuntimeError(f"{WHO}: this rank pruned differently from rank 0; the ranks' weights had "
                               "diverged before the cut (check other hooks that change the model)")

    def _log_report(self, runner) -> None:
        r = self.report
        saved = 100 * (1 - r["flops_after"] / r["flops_before"])
        runner.logger.info(
            f"{WHO}: cut at {self.at} ({r['policy']}, scope {self.scope}, "
            f"|γ| threshold {r['threshold']:.4g}): "
            f"FLOPs {r['flops_before'] / 1e6:.1f}M -> {r['flops_after'] / 1e6:.1f}M (-{saved:.1f}%), "
            f"params {r['params_before'] / 1e6:.3f}M -> {r['params_after'] / 1e6:.3f}M "
            f"in {r['surgery_seconds']:.1f}s")
        runner.visualizer.add_scalars({"slimnet/flops": r["flops_after"], "slimnet/params": r["params_after"],
                                       "slimnet/kept_flops_fraction": r["flops_after"] / r["flops_before"]},
                                      step=runner.iter)

    # -- after training, checkpoints ----------------------------------------------------------------------
    def after_train(self, runner) -> None:
        self.core.stop()
        if self.done and self.save_pruned and is_main_process():
            path = Path(runner.work_dir) / "pruned.pt"
            save_pruned(model_of(runner), path)
            runner.logger.info(f"{WHO}: the cut model is in {path} (slimnet.load_pruned(path, model))")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        summary = {k: v for k, v in (self.report or {}).items() if k in SUMMARY}
        store_meta(checkpoint, "slimming", {**self.core.state_dict(), "report": summary or None})
