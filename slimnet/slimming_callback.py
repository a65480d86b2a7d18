"""``SlimmingCallback``: cut any LightningModule's network for real at an epoch, and keep training.

What it needs from the module is what Lightning already asks of every module: ``configure_optimizers``
(re-run over the cut parameters) and ``example_input_array`` (or an ``example_input=`` argument).
The plan it cut by travels in its own checkpoint state and is replayed in ``setup``, before Lightning
loads the weights, so ``Trainer.fit(ckpt_path=…)`` resumes a cut run at the cut widths.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only

from slimnet.api import prune
from slimnet.checkpoint import PLAN_KEY, Slimmable
from slimnet.graph import trace_channel_groups
from slimnet.optim_state import carry_optimizer_state
from slimnet.plan import PrunePlan
from slimnet.submodule import resolve_submodule, submodule_input
from slimnet.surgery import replay_plan

log = logging.getLogger(__name__)

_FOLD_SAMPLES = 256            # inputs β folding averages the removed channels' outputs over
_FOLD_BYTES = 16 * 2**20       # ... at most this much of them (a detector's images are large)


class SlimmingCallback(Callback):
    """Cut the network for real at the start of epoch ``epoch``, then let training go on.

    At that epoch it ranks every BatchNorm channel of the module (or of the sub-module ``module``) by
    |γ| across the whole network, keeps those above ``thresh`` (or prunes the weakest ``percent``, or
    cuts down to ``target_flops`` of the FLOPs), never fewer than ``min_channels`` per layer, and removes
    the rest from the producing convs, the norms and every consumer. Then it re-runs the module's own
    ``configure_optimizers`` over the cut parameters (optionally carrying momentum and Adam moments of
    the surviving channels over), re-wraps DDP, and restarts "best" checkpoint ranking (a checkpoint
    from before the cut describes another architecture).

    Args:
        epoch: epoch at whose start the cut happens (the sparse phase is ``[0, epoch)``).
        thresh: absolute |γ| threshold; wins over ``percent``.
        percent: fraction of all BatchNorm channels to prune, ranked globally (Liu et al. 2017).
        target_flops: keep at most this fraction of the FLOPs (threshold searched on the sparse model);
            wins over ``percent``.
        module: dotted name of the sub-module to cut (``"backbone"``); None: the whole LightningModule.
        example_input: an input of the LightningModule (or of ``module`` if ``module_input=True``);
            default: the module's ``example_input_array``.
        module_input: ``example_input`` is already the sub-module's input.
        min_channels: channels every layer keeps at least.
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the constant output of removed channels (act(β) when γ → 0) into the bias of
            the layers reading them, averaged over the inputs the sub-module saw in the last validation
            (else training) epoch before the cut.
        carry_optimizer_state: give the rebuilt optimizers the state (momentum, Adam moments, steps)
            of the surviving channels instead of starting them fresh.
        evaluate: called as ``evaluate(trainer, pl_module)`` right after the cut; its float or dict
            of floats goes into the report (e.g. accuracy before any fine-tuning).
        leaf_modules: module classes traced as black boxes.
        save_sparse: write the sparsity-trained model (end of epoch ``epoch - 1``) as ``sparse.ckpt``
            beside the checkpoints, so other thresholds can be tried without training again.
        on_sparse_saved: called with that file's path once it is written.
        within: cut only channel groups whose norms all lie in these sub-modules of the cut network
            (dotted names relative to it); the layers outside that read them lose the same channels.

    Raises:
        ValueError: no policy, or thresh with target_flops; at fit start an epoch past the end, an
            unknown ``module``, no example input, or a network with nothing to cut.

    Example::

        trainer = pl.Trainer(max_epochs=12, callbacks=[slimnet.SparsityCallback(lam=1e-4, until_epoch=8),
                                                        slimnet.SlimmingCallback(epoch=8, percent=0.5)])
        trainer.fit(MyModule())
        cut = slimnet.load_checkpoint(trainer.checkpoint_callback.last_model_path, MyModule)
    """

    def __init__(self, epoch: int, thresh: float | None = None, percent: float | None = None,
                 target_flops: float | None = None, module: str | None = None, example_input=None,
                 module_input: bool = False, min_channels: int = 1, round_to: int = 1, fold_bias: bool = True,
                 carry_optimizer_state: bool = False, evaluate=None, leaf_modules=(), save_sparse: bool = False,
                 on_sparse_saved=None, within=None):
        if thresh is None and percent is None and target_flops is None:
            raise ValueError("SlimmingCallback needs thresh=…, percent=… or target_flops=…")
        if thresh is not None and target_flops is not None:
            raise ValueError("give SlimmingCallback thresh or target_flops, not both")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"SlimmingCallback: epoch={epoch!r} must be an integer >= 0")
        if percent is not None and not 0 <= percent < 1:
            raise ValueError(f"SlimmingCallback: percent={percent} must be in [0, 1)")
        if target_flops is not None and not 0 < target_flops <= 1:
            raise ValueError(f"SlimmingCallback: target_flops={target_flops} must be in (0, 1]")
        if min_channels < 1:
            raise ValueError(f"SlimmingCallback: min_channels={min_channels} must be >= 1")
        self.epoch = epoch
        self.thresh, self.target_flops = thresh, target_flops
        self.percent = None if thresh is not None or target_flops is not None else percent
        self.module, self.example_input, self.module_input = module, example_input, module_input
        self.min_channels, self.round_to, self.fold_bias = min_channels, round_to, fold_bias
        self.carry_optimizer_state, self.evaluate, self.leaf_modules = carry_optimizer_state, evaluate, leaf_modules
        self.save_sparse, self.on_sparse_saved = save_sparse, on_sparse_saved
        self.within = within
        self.done = False
        self.report: dict | None = None
        self.plan: PrunePlan | None = None
        self._inputs: tuple | None = None         # the sub-module's example input (batch of one is enough)
        self._fold_inputs: torch.Tensor | None = None  # real inputs recorded before the cut
        self._recording: list[torch.Tensor] | None = None
        self._hook = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module)

    @property
    def policy(self) -> str:
        return "thresh" if self.thresh is not None else "target_flops" if self.target_flops is not None else "percent"

    # -- set-up: replay a saved cut, find the example input, fail before training ------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._target(pl_module)  # a wrong name fails now
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
            target = self._target(pl_module)
            if state.get(PLAN_KEY) and getattr(target, "slimnet_plan", None) is None:
                replay_plan(target, PrunePlan.from_json(state[PLAN_KEY]))
            original(checkpoint)

        on_load_checkpoint._slimnet_replay = self
        on_load_checkpoint._slimnet_original = original
        pl_module.on_load_checkpoint = on_load_checkpoint

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
        if self.epoch >= trainer.max_epochs >= 0:
            raise ValueError(f"SlimmingCallback: epoch={self.epoch} is not before trainer.max_epochs="
                             f"{trainer.max_epochs}: the model would never be cut; lower it or train longer")
        if self.done:  # resumed after the cut: keep naming this phase's checkpoints as such
            self._new_checkpoint_phase(trainer, reset=False)
            return
        target = self._target(pl_module)
        self._inputs = _to(self._inputs, pl_module.device)  # recorded in setup, before the model moved
        graph = trace_channel_groups(target, self._inputs, self.leaf_modules)  # TraceError says why and how on
        if not any(group.prunable for group in graph.groups):
            raise ValueError(f"SlimmingCallback: {self.module or type(pl_module).__name__} has no channel group "
                             "that can be cut (" + ("; ".join(graph.warnings[:3]) or "no BatchNorm") + ")")
        if not isinstance(pl_module, Slimmable) and trainer.is_global_zero:
            log.info("%s.load_from_checkpoint cannot know of the cut: load cut checkpoints with "
                     "slimnet.load_checkpoint(path, %s), or add slimnet.Slimmable to its bases",
                     type(pl_module).__name__, type(pl_module).__name__)

    # -- recording real inputs for β folding --------------------------------------------------------
    def _recording_epoch(self, trainer) -> bool:
        return not self.done and self.fold_bias and trainer.current_epoch == self.epoch - 1

    def _start_recording(self, pl_module) -> None:
        self._stop_recording()
        self._recording = []
        target = self._fed(pl_module)

        def record(module, inputs):
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            held = sum(len(t) for t in self._recording)
            if x is None or x.dim() == 0 or held >= _FOLD_SAMPLES:
                return
            if self._recording and x.shape[1:] != self._recording[0].shape[1:]:
                return  # another size (a detector's batches differ): keep one shape to concatenate
            per_sample = max(x[:1].numel() * x.element_size(), 1)
            room = min(_FOLD_SAMPLES - held, _FOLD_BYTES // per_sample - held)
            if room > 0:
                self._recording.append(x[:room].detach().to("cpu", copy=True))

        self._hook = target.register_forward_pre_hook(record)

    def _stop_recording(self, keep: bool = False) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if keep and self._recording:
            self._fold_inputs = torch.cat(self._recording).contiguous()
        self._recording = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording_epoch(trainer):  # training inputs, unless a validation pass follows
            self._start_recording(pl_module)
        if self.done or trainer.current_epoch < self.epoch:
            return
        self._stop_recording()
        # The last validation before the cut (the sparse model), beside the after-cut evaluation below.
        before = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if not before and self.evaluate is not None:  # resumed at the cut (a shared sparse phase): measure it
            before = {"evaluate": self.evaluate(trainer, pl_module)}
        start = time.perf_counter()
        self.report = self._cut(trainer, pl_module)
        self.report["val_before_cut"] = before
        self.report["surgery_seconds"] = time.perf_counter() - start
        self.done = True
        if self.evaluate is not None:
            self.report["after_cut"] = self.evaluate(trainer, pl_module)
        self._log_report(trainer)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._recording_epoch(trainer) and not trainer.sanity_checking:
            self._stop_recording(keep=True)  # the training inputs, in case validation sees fewer
            self._start_recording(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._recording is not None and not trainer.sanity_checking:
            self._stop_recording(keep=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording is not None:
            self._stop_recording(keep=True)
        if self.save_sparse and not self.done and trainer.current_epoch == self.epoch - 1:
            path = self._save_sparse(trainer)
            if path is not None and self.on_sparse_saved is not None and trainer.is_global_zero:
                self.on_sparse_saved(path)

    # -- the cut ------------------------------------------------------------------------------------
    def _cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        target = self._target(pl_module)
        inputs = _to(self._inputs, pl_module.device)
        if self._fold_inputs is not None and len(inputs) == 1:
            inputs = (self._fold_inputs.to(pl_module.device),)
        policy = {self.policy: getattr(self, self.policy)}
        old_optimizers = list(trainer.optimizers)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = prune(target, inputs, min_channels=self.min_channels, round_to=self.round_to,
                           fold_bias=self.fold_bias, leaf_modules=self.leaf_modules, within=self.within,
                           **policy)
        for w in caught:  # through logging, so they reach the run log, once each
            log.warning(str(w.message))
        self.plan = target.slimnet_plan
        self._check_ranks_agree(trainer)
        self._rebuild_training_state(trainer)
        if self.carry_optimizer_state:
            for old, new in zip(old_optimizers, trainer.optimizers):
                carry_optimizer_state(old, new, target, report)
        self._new_checkpoint_phase(trainer)
        out = report.to_dict()
        out.update(warnings=[str(w.message) for w in caught], policy=self.policy, module=self.module)
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
    def _rebuild_training_state(trainer) -> None:
        """New parameters need new optimizers and schedules (the module's own configure_optimizers), and
        DDP a new wrapper: without it ranks would silently stop averaging gradients and diverge."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()  # wraps the cut module, broadcasting rank 0's weights
        strategy.setup_optimizers(trainer)

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
        return {"done": self.done, "report": self.report, "module": self.module,
                PLAN_KEY: self.plan.to_json() if self.plan is not None else "",
                "fold_inputs": self._fold_inputs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done = state_dict.get("done", False)
        self.report = state_dict.get("report")
        self.plan = PrunePlan.from_json(state_dict[PLAN_KEY]) if state_dict.get(PLAN_KEY) else None
        self._fold_inputs = state_dict.get("fold_inputs")

    @rank_zero_only
    def _log_report(self, trainer) -> None:
        r = self.report
        after = r.get("after_cut")
        after_text = f", right after the cut {after:.4f}" if isinstance(after, float) else ""
        log.info("surgery at epoch %d (%s, |γ| threshold %.4g): FLOPs %.1fM -> %.1fM (-%.1f%%), params %.3fM -> "
                 "%.3fM%s", trainer.current_epoch, r["policy"], r["threshold"], r["flops_before"] / 1e6,
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
