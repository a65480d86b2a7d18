"""``DetectionTask``: a LightningModule that trains a torchvision detector and reports COCO mAP.

It is an ordinary LightningModule: it knows nothing of slimming beyond the ``Slimmable`` mixin (so
``load_from_checkpoint`` rebuilds the cut widths). What a generic slimming callback needs it declares: ``example_input_array`` (a list with one image: what the detector's forward takes),
``prune_scope(scope)`` (the sub-module to cut, the input that sub-module receives, and what must not
be cut) and ``configure_optimizers`` that can be called again after a cut. Its learning-rate schedule is
a function of the trainer's global step, so an optimizer rebuilt after the cut continues the curve.

Metric: COCO mAP@[.5:.95] (``map``) and mAP@.5 (``map_50``) from torchmetrics'
``MeanAveragePrecision`` on the ``pycocotools`` backend, logged as ``val/map``, ``val/map_50``,
``test/map``, ``test/map_50``. Why pycocotools: it *is* the COCO evaluation (the numbers papers and
torchvision's references report), it is torchmetrics' default backend, and it installs here as a
manylinux wheel that needs only numpy (``pip install --dry-run pycocotools`` pulls no torch).
``faster-coco-eval`` installs as cleanly and is faster on large sets, but it is a re-implementation;
our validation sets are small, so exactness wins (``map_backend`` switches).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn

from slimnet.loops.lightning.checkpoint import Slimmable
from slimnet.models.build import build_model
from slimnet.tasks.detection.measure import detector_flops
from slimnet.tasks.detection.models import build_detector
from slimnet.tasks.detection.scope import PruneScope, prune_scope


def _mean_average_precision(backend: str):
    from torchmetrics.detection import MeanAveragePrecision

    try:
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=backend)
    except ModuleNotFoundError as err:  # torchmetrics names the missing backend package
        raise ModuleNotFoundError(
            f"COCO mAP needs the {backend} package ({err}): pip install 'slimnet[detection]'"
        ) from None


class DetectionTask(Slimmable, pl.LightningModule):
    """Train a torchvision detector (Faster R-CNN, RetinaNet, FCOS) and evaluate COCO mAP.

    Args:
        model_config: keyword arguments of ``slimnet.tasks.detection.models.build_detector`` (``kind``,
            ``backbone``, ``num_classes`` (foreground), ``min_size``, ``max_size``, ``norm``, …), or
            the same with a ``_target_`` naming the builder (as a run's config does); saved as a
            hyperparameter so ``load_from_checkpoint`` rebuilds the detector.
        image_size: the nominal (H, W) of an input image, for ``example_input_array``, the prune scope's
            example input and FLOPs.
        lr, momentum, weight_decay: SGD, as torchvision's detection references (0.02 for 16 images a
            batch there; scale it with the batch).
        warmup_steps: linear warm-up from ``lr / 1000`` over this many optimizer steps (detectors trained
            from a high learning rate diverge without it); then cosine decay to 0 over the fit.
        map_backend: ``pycocotools`` or ``faster_coco_eval`` (see the module docstring).
        model: an already built detector to use instead of ``model_config`` (not saved in checkpoints).

    Example::

        task = DetectionTask({"kind": "fcos", "backbone": "resnet18", "num_classes": dm.num_classes})
        pl.Trainer(max_epochs=10).fit(task, datamodule=dm)
    """

    def __init__(self, model_config: dict, image_size: int | tuple[int, int] = 128, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 1e-4, warmup_steps: int = 100,
                 map_backend: str = "pycocotools", model: nn.Module | None = None):
        super().__init__()
        if lr <= 0 or warmup_steps < 0:
            raise ValueError(f"lr must be > 0 and warmup_steps >= 0, got {lr} and {warmup_steps}")
        self.save_hyperparameters(ignore=["model"])
        if model is None:  # a run's config names its builder (_target_); older checkpoints hold its keywords
            model = build_model(model_config) if "_target_" in model_config else build_detector(**model_config)
        self.model = model
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        # What forward takes: a list of images. A tuple around it, because Lightning unpacks a tuple
        # into positional arguments (ModelSummary, and callbacks that follow its convention).
        self.example_input_array = ([torch.zeros(3, *self.image_size)],)
        self.val_map = _mean_average_precision(map_backend)
        self.test_map = _mean_average_precision(map_backend)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Training mode: the dict of losses (needs ``targets``); eval mode: one dict of ``boxes``,
        ``scores``, ``labels`` per image."""
        return self.model(images, targets)

    # -- what a slimming callback asks for ----------------------------------------------------------
    def prune_scope(self, scope: str = "backbone") -> PruneScope:
        """The sub-module to cut for ``scope`` (``backbone``, ``backbone+neck``, ``all``), named from
        this module (``model.backbone.body`` …), with the example input it receives, the layers outside
        it that read its channels and the layers whose outputs are never cut."""
        return prune_scope(self.model, scope, self.image_size, prefix="model")

    def flops(self) -> dict[str, int]:
        """Whole-detector FLOPs at ``image_size``, split into backbone, neck and heads."""
        return detector_flops(self.model, self.image_size)

    # -- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        n = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=n)
        return loss

    def _evaluate(self, batch, metric) -> None:
        images, targets = batch
        preds = self.model(images)
        metric.update(preds, [{k: t[k] for k in ("boxes", "labels", "iscrowd") if k in t} for t in targets])

    def _log_map(self, metric, stage: str) -> None:
        result = metric.compute()
        # -1 is COCO's "no ground truth": a split without boxes, which the data modules refuse
        self.log_dict({f"{stage}/map": result["map"].float(), f"{stage}/map_50": result["map_50"].float()},
                      prog_bar=stage == "val", sync_dist=False)  # torchmetrics already gathered ranks
        metric.reset()

    @torch.no_grad()
    def map_on(self, loader) -> dict[str, float]:
        """COCO mAP@[.5:.95] and mAP@.5 over ``loader`` outside a Lightning loop (e.g. right after a cut);
        the module's train/eval mode is restored."""
        was_training = self.training
        self.eval()
        metric = _mean_average_precision(self.hparams.map_backend).to(self.device)
        for images, targets in loader:
            images = [im.to(self.device) for im in images]
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            self._evaluate((images, targets), metric)
        result = metric.compute()
        self.train(was_training)
        return {"map": float(result["map"]), "map_50": float(result["map_50"])}

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    # -- optimisation --------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Linear warm-up from 1/1000, then cosine to 0 at the fit's last step."""
        w = self.hparams.warmup_steps
        if step < w:
            return 1e-3 + (1 - 1e-3) * step / w
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else step + 1
        progress = min(1.0, (step - w) / max(1, total - w))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def _global_step(self) -> int:
        return self.trainer.global_step if self._trainer is not None else 0

    def configure_optimizers(self):
        hp = self.hparams
        # No weight decay on norms and biases (as torchvision's references with --norm-weight-decay 0):
        # decaying BN γ would add a second, unwanted sparsity pressure next to slimming's own L1 term.
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, momentum=hp.momentum,
        )
        # The factor reads the trainer's global step, not the scheduler's own counter: a scheduler
        # rebuilt after surgery carries on from where the curve was.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self.lr_factor(self._global_step()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
