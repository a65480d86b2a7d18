"""``SlimModule``: the LightningModule of a classification slimming run.

It wraps a plain ``nn.Module`` (so surgery can swap that module's layers underneath it), trains it with
cross-entropy, and builds a different optimizer and schedule for each phase: ``sparse`` (before the cut)
and ``finetune`` (once the model carries a plan). It knows nothing of sparsity or surgery: the
``SparsityCallback`` and ``SlimmingCallback`` do both, exactly as they do in a user's own module, and
``Slimmable`` lets ``SlimModule.load_from_checkpoint`` rebuild a cut model.
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from slimnet.core.distill import distilled
from slimnet.engine.plan import PrunePlan
from slimnet.loops.lightning.checkpoint import Slimmable
from slimnet.models.build import build_model
from slimnet.tasks.classification.optimizers import build_optimizer, build_schedule

SPARSE, FINETUNE = "sparse", "finetune"


class SlimModule(Slimmable, pl.LightningModule):
    """Training of one classification model, in a sparse and a fine-tune phase.

    Args:
        model_config: the call that builds the model (a registry ``arch`` or a ``_target_``, with
            ``num_classes``, ``in_channels`` and the model's own options); saved as a hyperparameter so
            ``SlimModule.load_from_checkpoint(path)`` needs nothing else.
        optim: optimizer and schedule of the sparse phase (``name``, ``lr``, ``weight_decay``,
            ``momentum``, ``nesterov``, ``schedule``, ``milestones``, ``gamma``).
        finetune: overrides of ``optim`` for the fine-tune phase (``lr``, ``schedule``, …).
        prune_epoch: the epoch the model is cut at, or None for a run without pruning: the schedule of
            each phase spans that phase's epochs.
        num_classes: classes of the accuracy metric (default: ``model_config["num_classes"]``).
        model: an already built ``nn.Module`` to use instead of ``model_config`` (not saved in
            checkpoints; pass it again to ``load_from_checkpoint``).
        channels_last: train in NHWC memory format (conv weights and input batches): oneDNN's CPU convs
            and cuDNN's tensor-core convs run faster in it. It changes the floating-point summation order,
            never shapes or what is computed.
    """

    def __init__(self, model_config: dict, optim: dict, finetune: dict | None = None,
                 prune_epoch: int | None = None, num_classes: int | None = None, model: nn.Module | None = None,
                 channels_last: bool = False, example_input_array: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "example_input_array"])
        self.model = model if model is not None else build_model(model_config)
        self.example_input_array = example_input_array
        self.channels_last = channels_last
        if channels_last:  # surgery and plan replays keep each tensor's layout, so once is enough
            self.model.to(memory_format=torch.channels_last)
        num_classes = num_classes or model_config["num_classes"]
        self.criterion = nn.CrossEntropyLoss()
        metric = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = metric(num_classes=num_classes, average="micro")
        self.val_acc = metric(num_classes=num_classes, average="micro")
        self.test_acc = metric(num_classes=num_classes, average="micro")

    # -- phases -------------------------------------------------------------------------------------
    @property
    def plan(self) -> PrunePlan | None:
        return getattr(self.model, "slimnet_plan", None)

    @property
    def phase(self) -> str:
        """``finetune`` once the model has been cut (or restored at cut widths), else ``sparse``."""
        return FINETUNE if self.plan is not None and self.hparams.prune_epoch is not None else SPARSE

    def phase_epochs(self) -> int:
        total = self.trainer.max_epochs
        cut = self.hparams.prune_epoch
        if cut is None:
            return total
        return cut if self.phase == SPARSE else total - cut

    # -- steps --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str, metric: torchmetrics.Metric) -> torch.Tensor:
        x, y = batch
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)  # (B, num_classes)
        loss = self.criterion(logits, y)
        if stage == "train":  # the uncut model's soft targets, once a SlimmingCallback(distill=…) has cut
            loss = distilled(self, x, logits, loss)
        metric(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "test", sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train", self.train_acc)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step} ({self.phase} "
                "phase): lower optim.lr or sparsity.lam; the last good checkpoint is left as it was")
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc)

    @torch.no_grad()
    def accuracy_on(self, loader) -> float:
        """Top-1 accuracy of the network over a loader of ``(x, y)`` batches, in eval mode."""
        was_training = self.training
        self.eval()
        correct = total = 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            correct += int((self.model(x).argmax(1) == y).sum())
            total += len(y)
        self.train(was_training)
        return correct / max(total, 1)

    # -- optimizers ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = dict(self.hparams.optim)
        if self.phase == FINETUNE:
            cfg.update({k: v for k, v in (self.hparams.finetune or {}).items() if v is not None})
        schedule = cfg.pop("schedule", "constant")
        sched_args = {k: cfg.pop(k) for k in ("milestones", "gamma", "pct_start") if k in cfg}
        optimizer = build_optimizer(self.model.parameters(), **cfg)
        steps_per_epoch = self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs, 1)
        total_steps = round(steps_per_epoch * self.phase_epochs())
        scheduler = build_schedule(optimizer, schedule, total_steps, **sched_args)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["slimnet"] = {"phase": self.phase, "rng": _rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # Slimmable: the cut widths, before the weights load
        state = checkpoint.get("slimnet", {})
        if self._trainer is not None and state.get("rng"):
            # Resuming a fit: continue the random streams (augmentation, dropout, a user data module's
            # shuffling) where the checkpoint left them, so a resumed run retraces an uninterrupted one
            # on CPU. This holds as long as nothing at the start of an epoch draws from them: a resumed
            # fit starts its first training iterator before the epoch-start hooks, an uninterrupted one
            # after them (pipeline._val_accuracy, docs/reliability.md).
            _set_rng_state(state["rng"])


def _rng_state() -> dict:
    """The global random streams ``seed_everything`` seeds, in types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(s if not isinstance(s, list) else tuple(s) for s in state["python"]))
    if state.get("numpy"):  # checkpoints before numpy's state was kept leave it as seeded
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
