"""``SlimmingCallback``: cut any LightningModule's network for real at an epoch, and keep training.

What it needs from the module is what Lightning already asks of every module: ``example_input_array``
(or an ``example_input=`` argument), and ``configure_optimizers`` only when asked to restart the schedule.
By default the module's own optimizers are pointed at the cut parameters in place, with their state,
so the schedules stepping them go on where they were. The plan it cut by travels in its own checkpoint
state and is replayed in ``setup``, before Lightning loads the weights, so ``Trainer.fit(ckpt_path=…)``
resumes a cut run at the cut widths.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.seed import isolate_rng

from slimnet.core import Distillation, Slimming
from slimnet.core.distill import ATTRIBUTE as DISTILL_ATTRIBUTE
from slimnet.core.submodule import resolve_submodule, submodule_input
from slimnet.engine.plan import PrunePlan
from slimnet.loops.lightning.checkpoint import Slimmable

log = logging.getLogger(__name__)



class SlimmingCallback(Callback):
    """Cut the network for real at the start of epoch ``epoch``, then let training go on.

    At that epoch it ranks every BatchNorm channel of the module (or of the sub-module ``module``) by
    |γ| across the whole network, keeps those above ``thresh`` (or prunes the weakest ``percent``, or
    cuts down to ``target_flops`` of the FLOPs), never fewer than ``min_channels`` per layer, and removes
    the rest from the producing convs, the norms and every consumer. Then the module's optimizers hold
    the cut parameters, with the momentum and Adam moments of the surviving channels, and their
    schedules go on where they were (``restart_schedule=True`` re-runs ``configure_optimizers``
    instead); DDP is re-wrapped, and "best" checkpoint ranking restarts (a checkpoint from before the
    cut describes another architecture). The cut is logged (FLOPs before and after, the threshold,
    ``evaluate``'s value) and its report kept in ``self.report``.

    Norms whose γ is frozen (``requires_grad=False``: a detector's frozen stages, FrozenBatchNorm2d) were
    never sparsity-trained: their groups are kept whole and named, unless ``cut_frozen=True``.

    Args:
        epoch: epoch at whose start the cut happens (the sparse phase is ``[0, epoch)``).
        thresh: absolute |γ| threshold; wins over ``percent``.
        percent: fraction of all BatchNorm channels to prune, ranked globally (Liu et al. 2017).
        target_flops: keep at most this fraction of the FLOPs (threshold searched on the sparse model);
            wins over ``percent``.
        target_latency: keep at most this fraction of the latency measured on this machine (or predicted by
            ``latency_table``, a table from the deployment device), channels chosen by |γ| per unit of
            latency saved (``slimnet.engine.latency_budget``); ``latency_settings``: batch, threads, backend…
        module: dotted name of the sub-module to cut (``"backbone"``); None: the whole LightningModule.
        example_input: an input of the LightningModule (or of ``module`` if ``module_input=True``);
            default: the module's ``example_input_array``.
        module_input: ``example_input`` is already the sub-module's input.
        min_channels: channels every layer keeps at least.
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the constant output of removed channels (act(β) when γ → 0) into the bias of
            the layers reading them, averaged over the inputs the sub-module saw in the last validation
            (else training) epoch before the cut. Only per-feature statistics of those inputs are kept
            (in checkpoints too, until the cut), never the samples.
        restart_schedule: re-run the module's ``configure_optimizers`` after the cut (new optimizers and
            schedules from step 0, e.g. a fine-tune phase with its own learning rate) instead of
            carrying the optimizers and their schedules over the cut.
        carry_optimizer_state: keep the state (momentum, Adam moments, steps) of the surviving
            channels; False starts the optimizer state afresh.
        cut_frozen: rank and cut norms whose γ does not require grad, as if they had been trained.
        evaluate: called as ``evaluate(trainer, pl_module)`` right after the cut; its float or dict
            of floats goes into the report (e.g. accuracy before any fine-tuning).
        leaf_modules: module classes traced as black boxes.
        save_sparse: write the sparsity-trained model (end of epoch ``epoch - 1``) as ``sparse.ckpt``
            beside the checkpoints, so other thresholds can be tried without training again.
        on_sparse_saved: called with that file's path once it is written.
        within: cut only channel groups whose norms all lie in these sub-modules of the cut network
            (dotted names relative to it); the layers outside that read them lose the same channels.
        distill: fine-tune with a frozen copy of the uncut network as teacher (``True`` or a
            ``slimnet.core.Distillation(temperature, weight)``): the module's training step mixes its
            soft targets in with ``loss = slimnet.distilled(self, x, logits, loss)``. Needs ``module``
            (the network whose output is the logits); implies ``save_sparse`` (a resumed fine-tune
            restores the teacher from ``sparse.ckpt``, not from a copy in every checkpoint).

    Raises:
        ValueError: no policy, or thresh with target_flops; before training an epoch past the end, an
            unknown ``module``, no example input, a network with nothing to cut, or a strategy whose
            parameters the callback cannot replace (FSDP, DeepSpeed: use DDP or one device).
        slimnet.errors.NothingCutError: at the cut, a ``percent`` or ``target_flops`` that removes nothing.

    Example::

        trainer = pl.Trainer(max_epochs=12, callbacks=[slimnet.SparsityCallback(lam=1e-4, until_epoch=8),
                                                        slimnet.SlimmingCallback(epoch=8, percent=0.5)])
        trainer.fit(MyModule())
        cut = slimnet.load_checkpoint(trainer.checkpoint_callback.last_model_path, MyModule)
    """

    def __init__(self, epoch: int, thresh: float | None = None, percent: float | None = None,
                 target_flops: float | None = None, module: str | None = None, example_input=None,
                 module_input: bool = False, min_channels: int = 1, round_to: int = 1, fold_bias: bool = True,
                 restart_schedule: bool = False, carry_optimizer_state: bool = True, cut_frozen: bool = False,
                 evaluate=None, leaf_modules=(), save_sparse: bool = False, on_sparse_saved=None, within=None,
                 distill: Distillation | bool | None = None, target_latency: float | None = None,
                 latency_table=None, latency_settings=None):
        distill = Distillation(where="SlimmingCallback") if distill is True else distill or None
        if distill is not None and not module:
            raise ValueError("SlimmingCallback(distill=…) needs module='<the network attribute>' (e.g. "
                             "module='model'): the teacher is a frozen copy of that network")
        self.core = Slimming(epoch, thresh, percent, target_flops, min_channels=min_channels, round_to=round_to,
                             fold_bias=fold_bias, carry_optimizer_state=carry_optimizer_state, cut_frozen=cut_frozen,
                             leaf_modules=leaf_modules, within=within, distill=distill,
                             target_latency=target_latency, latency_table=latency_table,
                             latency_settings=latency_settings, where="SlimmingCallback")
        self.module, self.example_input, self.module_input = module, example_input, module_input
        self.restart_schedule, self.evaluate = restart_schedule, evaluate
        self.save_sparse, self.on_sparse_saved = save_sparse or distill is not None, on_sparse_saved
        self.report: dict | None = None
        self._inputs: tuple | None = None  # the sub-module's example input (batch of one is enough)
        self._teacher_from: str | None = None  # a checkpoint holding the uncut network's weights at the cut
        self._skeleton: torch.nn.Module | None = None  # an uncut copy for a resumed fine-tune's teacher
        self._sparse_path: Path | None = None
        self._trainer: pl.Trainer | None = None

    @property
    def distill(self) -> Distillation | None:
        return self.core.distill

    @property
    def epoch(self) -> int:
        return self.core.epoch

    @property
    def done(self) -> bool:
        return self.core.done

    @property
    def plan(self) -> PrunePlan | None:
        return self.core.plan

    @property
    def policy(self) -> str:
        return self.core.policy

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    # -- set-up: replay a saved cut, find the example input, fail before training ------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._target(pl_module)  # a wrong name fails now
        if stage == "fit":
            _check_strategy(trainer.strategy)
        self._replay_before_weights_load(pl_module)
        if stage == "fit":
            self._inputs = self._example(pl_module)

    def _replay_before_weights_load(self, pl_module: pl.LightningModule) -> None:
        """Lightning restores a checkpoint's weights right after the module's ``on_load_checkpoint`` hook,
        and no callback hook runs in between: so this instance's hook is wrapped to cut the model to the
        saved widths first (undone in ``teardown``). The module's class is not touched."""
        if getattr(pl_module.on_load_checkpoint, "_slimnet_replay", None) is self:
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict) -> None:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
            self._note_teacher(pl_module, state)
            self.core.replay(self._target(pl_module), state)
            original(checkpoint)

        on_load_checkpoint._slimnet_replay = self
        on_load_checkpoint._slimnet_original = original
        pl_module.on_load_checkpoint = on_load_checkpoint

    def _note_teacher(self, pl_module: pl.LightningModule, state: dict) -> None:
        """While a resumed module is still uncut: a fine-tune's teacher needs an uncut copy to load into; a
        sparse-phase checkpoint (a shared sparse phase) is where the teacher's weights will be."""
        if self.distill is None or self._trainer is None or self._trainer.state.fn != "fit":
            return
        if state.get("done"):
            self._skeleton = copy.deepcopy(self._target(pl_module))
        elif self._trainer.ckpt_path:
            self._teacher_from = str(self._trainer.ckpt_path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        hook = pl_module.__dict__.get("on_load_checkpoint")
        if getattr(hook, "_slimnet_replay", None) is self:
            del pl_module.on_load_checkpoint

    def _target(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The network that is traced and cut (a subclass may trace a wrapper around it)."""
        return resolve_submodule(pl_module, self.module, "SlimmingCallback")

    def _fed(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The module whose first input is the cut network's input during training (recorded for folding)."""
        return self._target(pl_module)

    def _example(self, pl_module: pl.LightningModule) -> tuple:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(f"SlimmingCallback: {type(pl_module).__name__} has no example_input_array; set "
                             "self.example_input_array = torch.zeros(1, C, H, W) in its __init__, or pass "
                             "example_input= to the callback")
        example = pl_module.transfer_batch_to_device(example, pl_module.device, 0)
        if self.module_input or not self.module:
            if not self.module and type(pl_module).forward is pl.LightningModule.forward:
                raise ValueError(f"SlimmingCallback: {type(pl_module).__name__} defines no forward(); pass "
                                 "module='<the network attribute>' (e.g. module='model') to cut that sub-module")
            return tuple(example) if isinstance(example, (tuple, list)) else (example,)
        return submodule_input(pl_module, self.module, example, "SlimmingCallback")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _make_visible(log)
        self.core.check(trainer.max_epochs)
        if self.done:  # resumed after the cut: keep naming this phase's checkpoints as such
            self._new_checkpoint_phase(trainer, reset=False)
            self._restore_teacher(trainer, pl_module)
            return
        self._inputs = _to(self._inputs, pl_module.device)  # recorded in setup, before the model moved
        self.core.check_cuttable(self._target(pl_module), self._inputs, self.module or type(pl_module).__name__)
        if not isinstance(pl_module, Slimmable) and trainer.is_global_zero:
            log.info("%s.load_from_checkpoint cannot know of the cut: load cut checkpoints with "
                     "slimnet.load_checkpoint(path, %s), or add slimnet.Slimmable to its bases",
                     type(pl_module).__name__, type(pl_module).__name__)

    # -- recording what β folding needs from real inputs ---------------------------------------------
    def _recording_epoch(self, trainer) -> bool:
        return self.core.records(trainer.current_epoch, self._inputs)

    def _start_recording(self, pl_module) -> None:
        self.core.record(self._target(pl_module), self._fed(pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording_epoch(trainer):  # training inputs, unless a validation pass follows
            self._start_recording(pl_module)
        if not self.core.due(trainer.current_epoch):
            return
        # The last validation before the cut (the sparse model), beside the after-cut evaluation below.
        before = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if not before and self.evaluate is not None:  # resumed at the cut (a shared sparse phase): measure it
            before = {"evaluate": self._evaluate(trainer, pl_module)}
        start = time.perf_counter()
        self.report = self._cut(trainer, pl_module)
        if self.distill is not None:
            self._teacher_from = self._teacher_from or (str(self._sparse_path) if self._sparse_path else None)
            self._hand_teacher(pl_module)
        self.report["val_before_cut"] = before
        self.report["surgery_seconds"] = time.perf_counter() - start
        if self.evaluate is not None:
            self.report["after_cut"] = self._evaluate(trainer, pl_module)
        self._log_report(trainer)

    def _restore_teacher(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fine-tune resumed after the cut: the teacher's weights from the sparse-phase checkpoint."""
        if self.distill is None or self.distill.ready:
            return
        source = self._teacher_from
        if self._skeleton is None or not source or not Path(source).is_file():
            raise ValueError(f"SlimmingCallback(distill=…): the teacher's weights were in {source or 'no checkpoint'}, "
                             "which is gone; resume with that sparse.ckpt in place, or without distill")
        state = trainer.strategy.checkpoint_io.load_checkpoint(source)["state_dict"]
        prefix = f"{self.module}."
        self.distill.restore(self._skeleton, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self._skeleton = None
        self._hand_teacher(pl_module)

    def _hand_teacher(self, pl_module: pl.LightningModule) -> None:
        """Where ``slimnet.distilled(module, …)`` finds the teacher: on the module, not as a sub-module."""
        self.distill.to(pl_module.device)
        object.__setattr__(pl_module, DISTILL_ATTRIBUTE, self.distill)
        log.info("distilling from the uncut network (T=%g, weight %g): its teacher holds %.1f MB",
                 self.distill.temperature, self.distill.weight, self.distill.teacher_bytes() / 1e6)

    def _evaluate(self, trainer, pl_module):
        """``evaluate``, with the random streams as they were: a loader it iterates draws a seed, and a
        run resumed at the cut (which evaluates once more) would otherwise shuffle differently after it."""
        with isolate_rng():
            return self.evaluate(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._recording_epoch(trainer) and not trainer.sanity_checking:
            self.core.stop(keep=True)  # the training inputs, in case validation sees fewer
            self._start_recording(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.core.stop(keep=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.core.stop(keep=True)
        if self.save_sparse and not self.done and trainer.current_epoch == self.epoch - 1:
            path = self._sparse_path = self._save_sparse(trainer)
            if path is not None and self.on_sparse_saved is not None and trainer.is_global_zero:
                self.on_sparse_saved(path)

    # -- the cut ------------------------------------------------------------------------------------
    def _cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        target = self._target(pl_module)
        old_optimizers = list(trainer.optimizers)
        report, messages = self.core.cut(target, _to(self._inputs, pl_module.device),
                                         None if self.restart_schedule else old_optimizers)
        for message in messages:  # through logging, so they reach the run log, once each
            log.warning(message)
        self._check_ranks_agree(trainer)
        self._rewrap(trainer)
        if self.restart_schedule:  # the module's own configure_optimizers, schedules from step 0
            trainer.strategy.setup_optimizers(trainer)
            self.core.carry_into(old_optimizers, trainer.optimizers, target, report)
        self._new_checkpoint_phase(trainer)
        out = report.to_dict()
        out.update(warnings=messages, policy=self.policy, module=self.module)
        return out

    def _check_ranks_agree(self, trainer) -> None:
        """Every rank cut the same channels (DDP keeps weights equal, so they must): verify, loudly."""
        if trainer.world_size <= 1:
            return
        mine = self.plan.to_json()
        if trainer.strategy.broadcast(mine, src=0) != mine:
            raise RuntimeError(f"rank {trainer.global_rank} pruned differently from rank 0; the ranks' weights "
                               "had diverged before surgery (check custom callbacks that change the model)")

    @staticmethod
    def _rewrap(trainer) -> None:
        """DDP needs a new wrapper around the cut module: without it ranks would silently stop averaging
        gradients and diverge."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()  # wraps the cut module, broadcasting rank 0's weights

    @staticmethod
    def _new_checkpoint_phase(trainer, reset: bool = True) -> None:
        """A "best" checkpoint from before surgery describes another architecture: start a new ranking."""
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor is not None:
                if reset:
                    cb.best_k_models, cb.kth_best_model_path, cb.best_model_path = {}, "", ""
                    cb.best_model_score = None
                    cb.kth_value = torch.tensor(-torch.inf if cb.mode == "max" else torch.inf)
                if cb.filename is None or not str(cb.filename).startswith("finetune-"):
                    cb.filename = "finetune-" + (cb.filename or "{epoch}-{step}")

    @staticmethod
    def _save_sparse(trainer) -> Path | None:
        cb = trainer.checkpoint_callback
        if cb is None or not cb.dirpath:
            return None
        path = Path(cb.dirpath) / "sparse.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # all ranks take part; rank 0 writes
        return path

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self.core.state_dict(), "report": self.report, "module": self.module,
                "teacher_from": self._teacher_from}

    def load_state_dict(self, state_dict: dict) -> None:
        self.core.load_state_dict(state_dict)
        self.report = state_dict.get("report")
        self._teacher_from = state_dict.get("teacher_from") or self._teacher_from

    @rank_zero_only
    def _log_report(self, trainer) -> None:
        r = self.report
        after = r.get("after_cut")
        after_text = f", right after the cut {after:.4f}" if isinstance(after, float) else ""
        threshold = f"{r['threshold']:.4g}" if isinstance(r.get("threshold"), (int, float)) else "n/a"
        log.info("surgery at epoch %d (%s, |γ| threshold %s): FLOPs %.1fM -> %.1fM (-%.1f%%), params %.3fM -> "
                 "%.3fM%s", trainer.current_epoch, r["policy"], threshold, r["flops_before"] / 1e6,
                 r["flops_after"] / 1e6, 100 * (1 - r["flops_after"] / r["flops_before"]),
                 r["params_before"] / 1e6, r["params_after"] / 1e6, after_text)
        metrics = {"model/flops": r["flops_after"], "model/params": r["params_after"],
                   "model/kept_flops_fraction": r["flops_after"] / r["flops_before"]}
        if isinstance(after, dict):
            metrics.update({f"after_cut/{k}": v for k, v in after.items()})
        elif after is not None:
            metrics["after_cut"] = after
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _to(inputs: tuple, device: torch.device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _check_strategy(strategy) -> None:
    """Surgery replaces parameters: a strategy that shards or owns them (FSDP, DeepSpeed) would keep
    training the old ones, or fail somewhere deep. One device and DDP (any start method) are supported."""
    if isinstance(strategy, SingleDeviceStrategy) or type(strategy) is DDPStrategy:
        return
    name = type(strategy).__name__
    raise ValueError(f"SlimmingCallback: strategy {name} is not supported (surgery replaces parameters that "
                     f"{name} shards or wraps); train with strategy='ddp' or on one device")


def _make_visible(logger: logging.Logger) -> None:
    """In a script where nobody set up logging, say the cut on the console, as Lightning says its own
    lines; where logging is set up (the CLI's Hydra, a user's basicConfig), leave it to that set-up."""
    if logger.hasHandlers():
        return
    package = logging.getLogger("slimnet")
    package.setLevel(logging.INFO)
    package.addHandler(logging.StreamHandler())
    package.propagate = False
