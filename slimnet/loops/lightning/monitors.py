"""Lightning callbacks: the two that slim (re-exported here) and the γ / phase-time monitors."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only
from torch.nn.modules.batchnorm import _BatchNorm

from slimnet.core.submodule import resolve_submodule
from slimnet.loops.lightning.slimming_callback import SlimmingCallback
from slimnet.loops.lightning.sparsity_callback import SparsityCallback

__all__ = ["GammaMonitor", "PhaseTimer", "SlimmingCallback", "SparsityCallback", "cut_done"]


def cut_done(trainer: pl.Trainer) -> bool:
    """Whether a ``SlimmingCallback`` of this trainer has cut the model (this fit or before a resume)."""
    return any(isinstance(cb, SlimmingCallback) and cb.done for cb in trainer.callbacks)


class GammaMonitor(Callback):
    """Each epoch: a histogram of γ per BatchNorm layer, and the channel count of each, in TensorBoard.

    ``module``: the sub-module to watch (dotted name); None: the whole LightningModule.
    """

    def __init__(self, histograms: bool = True, module: str | None = None):
        self.histograms, self.module = histograms, module

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            watched = resolve_submodule(pl_module, self.module, "GammaMonitor")
            norms = [(n, m) for n, m in watched.named_modules()
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
            phase = "finetune" if cut_done(trainer) else "sparse"
            self.seconds[phase] += time.perf_counter() - self._epoch_start
            self.epochs_here[phase] += 1

    def state_dict(self) -> dict:
        return {"seconds": dict(self.seconds)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds.update(state_dict.get("seconds", {}))
