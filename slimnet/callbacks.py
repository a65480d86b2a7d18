"""Lightning callbacks: the surgery at the prune epoch, and the γ / phase-time monitors."""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only
from torch.nn.modules.batchnorm import _BatchNorm

from slimnet.api import prune
from slimnet.budget import threshold_for_flops

log = logging.getLogger(__name__)


class SlimmingCallback(Callback):
    """Cut the model for real at the start of epoch ``epoch``, then switch to fine-tuning.

    At that epoch it ranks every BatchNorm channel by |γ| across the whole network, keeps those above
    ``thresh`` (or prunes the weakest ``percent``), never fewer than ``min_channels`` per layer, and
    removes the rest from the producing convs, the norms and every consumer. The optimizer and schedule
    are then rebuilt for the fine-tune phase.

    Args:
        epoch: epoch at whose start surgery happens (the sparse phase is ``[0, epoch)``).
        example_input: a tensor of the model's input shape (batch of one is enough).
        thresh: absolute |γ| threshold; wins over ``percent`` when both are set.
        percent: fraction of all BatchNorm channels to prune, ranked globally.
        target_flops: keep at most this fraction of the FLOPs: the threshold is searched on the
            sparse model (no training per probe); wins over ``percent``.
        min_channels: channels every layer keeps at least.
        round_to: keep channel counts a multiple of this, rounding up.
        fold_bias: fold the constant output of removed channels (act(β) when γ → 0) into the bias of
            the layers reading them, measured on a batch of real validation images.
        eval_after_cut: measure validation accuracy right after surgery, before any fine-tuning.
        save_sparse: write the sparsity-trained model (end of epoch ``epoch - 1``, before surgery) as
            ``sparse.ckpt`` beside the checkpoints, so other thresholds can be tried without training again.
        on_sparse_saved: called with that file's path once it is written (the sweep cache publishes it).

    Example::

        trainer = pl.Trainer(max_epochs=12, callbacks=[SlimmingCallback(epoch=8, example_input=x, thresh=0.1)])
    """

    def __init__(self, epoch: int, example_input: torch.Tensor, thresh: float | None = None,
                 percent: float | None = None, target_flops: float | None = None, min_channels: int = 1, round_to: int = 1,
                 fold_bias: bool = True, eval_after_cut: bool = True, save_sparse: bool = False, on_sparse_saved=None):
        if thresh is None and percent is None and target_flops is None:
            raise ValueError("SlimmingCallback needs thresh=…, percent=… or target_flops=…")
        if thresh is not None and target_flops is not None:
            raise ValueError("give SlimmingCallback thresh or target_flops, not both")
        if epoch < 0:
            raise ValueError(f"prune epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self.example_input = example_input
        self.thresh, self.percent, self.target_flops = thresh, percent, target_flops
        self.min_channels, self.round_to, self.fold_bias = min_channels, round_to, fold_bias
        self.eval_after_cut, self.save_sparse = eval_after_cut, save_sparse
        self.on_sparse_saved = on_sparse_saved
        self.done = False
        self.report: dict | None = None

    # -- hooks --------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch >= trainer.max_epochs:
            raise ValueError(f"prune.epoch={self.epoch} is not before trainer.max_epochs={trainer.max_epochs}: "
                             "the model would never be cut; lower prune.epoch or raise trainer.max_epochs")
        if self.done:  # resumed after surgery: keep naming this phase's checkpoints as such
            self._new_checkpoint_phase(trainer, reset=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or trainer.current_epoch < self.epoch:
            return
        start = time.perf_counter()
        self.report = self._cut(trainer, pl_module)
        self.report["surgery_seconds"] = time.perf_counter() - start
        self._check_ranks_agree(trainer, pl_module)
        pl_module.enter_finetune()
        self._rebuild_training_state(trainer)
        self._new_checkpoint_phase(trainer)
        if self.eval_after_cut:
            self.report["val_acc_after_cut"] = self._evaluate(trainer, pl_module)
        self.done = True
        self._log_report(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_sparse and not self.done and trainer.current_epoch == self.epoch - 1:
            path = self._save_sparse(trainer)
            if path is not None and self.on_sparse_saved is not None and trainer.is_global_zero:
                self.on_sparse_saved(path)

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done = state_dict.get("done", False)
        self.report = state_dict.get("report")

    # -- work ---------------------------------------------------------------------------------------
    def _real_batch(self, trainer, pl_module, size: int = 256) -> torch.Tensor:
        """A batch of real validation images: β folding averages removed channels' outputs over it
        (exact for γ = 0 with any input, better with real data when γ is small but not zero)."""
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if datamodule is not None else None
        if not loader:
            return self.example_input.to(pl_module.device)
        images = []
        for x, _ in loader:
            images.append(x)
            if sum(len(b) for b in images) >= size:
                break
        return torch.cat(images)[:size].to(pl_module.device)

    def _cut(self, trainer, pl_module) -> dict:
        x = self._real_batch(trainer, pl_module)
        policy = {"thresh": self.thresh} if self.thresh is not None else {"percent": self.percent}
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if self.target_flops is not None:
                thresh, _ = threshold_for_flops(pl_module.model, x, self.target_flops,
                                                min_channels=self.min_channels, round_to=self.round_to)
                policy = {"thresh": thresh} if thresh > -math.inf else {"percent": 0.0}
            report = prune(pl_module.model, x, min_channels=self.min_channels, round_to=self.round_to,
                           fold_bias=self.fold_bias, **policy)
        for w in caught:  # re-issue through logging so they reach the run log, once each
            log.warning(str(w.message))
        report["warnings"] = [str(w.message) for w in caught]
        report["policy"] = ("thresh" if self.thresh is not None else
                            "target_flops" if self.target_flops is not None else "percent")
        report.pop("plan")
        return report

    @staticmethod
    def _check_ranks_agree(trainer, pl_module) -> None:
        """Every rank cut the same channels (DDP keeps weights equal, so they must): verify, loudly."""
        if trainer.world_size <= 1:
            return
        mine = pl_module.plan.to_json()
        if trainer.strategy.broadcast(mine, src=0) != mine:
            raise RuntimeError(f"rank {trainer.global_rank} pruned differently from rank 0; the ranks' weights "
                               "had diverged before surgery (check custom callbacks that change the model)")

    @staticmethod
    def _rebuild_training_state(trainer) -> None:
        """New parameters need a new optimizer and schedule, and DDP a new wrapper.

        ``DistributedDataParallel`` holds references to the old parameters and its gradient buckets are
        sized for them: without re-wrapping, ranks would silently stop averaging gradients and diverge.
        """
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()  # wraps the cut module, broadcasting rank 0's weights
        strategy.setup_optimizers(trainer)  # fresh optimizer + schedule over the fine-tune epochs

    @torch.no_grad()
    def _evaluate(self, trainer, pl_module) -> float | None:
        datamodule = trainer.datamodule
        if datamodule is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        for batch in datamodule.val_dataloader():
            x, y = (t.to(pl_module.device) for t in batch)
            correct += int((pl_module.model(x).argmax(1) == y).sum())
            total += len(y)
        pl_module.train(was_training)
        return correct / max(total, 1)

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

    @rank_zero_only
    def _log_report(self, trainer, pl_module) -> None:
        r = self.report
        flops_cut = 1 - r["flops_after"] / r["flops_before"]
        log.info(
            "surgery at epoch %d (%s, |γ| threshold %.4g): FLOPs %.1fM -> %.1fM (-%.1f%%), params %.3fM -> "
            "%.3fM, val acc right after the cut %s", trainer.current_epoch, r["policy"], r["threshold"],
            r["flops_before"] / 1e6, r["flops_after"] / 1e6, 100 * flops_cut, r["params_before"] / 1e6,
            r["params_after"] / 1e6, f"{r['val_acc_after_cut']:.4f}" if r.get("val_acc_after_cut") is not None else "n/a")
        metrics = {"model/flops": r["flops_after"], "model/params": r["params_after"],
                   "model/kept_flops_fraction": r["flops_after"] / r["flops_before"]}
        if r.get("val_acc_after_cut") is not None:
            metrics["val/acc_after_cut"] = r["val_acc_after_cut"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class GammaMonitor(Callback):
    """Each epoch: a histogram of γ per BatchNorm layer, and the channel count of each, in TensorBoard."""

    def __init__(self, histograms: bool = True):
        self.histograms = histograms

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            norms = [(n, m) for n, m in pl_module.model.named_modules()
                     if isinstance(m, _BatchNorm) and m.weight is not None]
            for name, m in norms:
                if self.histograms:
                    writer.add_histogram(f"gamma/{name}", m.weight.detach().abs().float().cpu(), trainer.current_epoch)
                writer.add_scalar(f"channels/{name}", m.weight.numel(), trainer.current_epoch)
            total = sum(m.weight.numel() for _, m in norms)
            writer.add_scalar("channels/total", total, trainer.current_epoch)


class PhaseTimer(Callback):
    """Wall time of the sparse and fine-tune phases (carried across resumes), and the epochs this
    process itself trained in each (not carried: a job that reused a sparse phase trained none)."""

    def __init__(self):
        self.seconds = {"sparse": 0.0, "finetune": 0.0}
        self.epochs_here = {"sparse": 0, "finetune": 0}
        self._epoch_start = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:
            phase = getattr(pl_module, "phase", "sparse")
            self.seconds[phase] += time.perf_counter() - self._epoch_start
            self.epochs_here[phase] += 1

    def state_dict(self) -> dict:
        return {"seconds": dict(self.seconds)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds.update(state_dict.get("seconds", {}))
