"""DetectionTask: trains torchvision detectors on the synthetic set, reports COCO mAP, rebuilds its
optimizer mid-fit without a jump in the learning rate. Tiny: 64 px images, resnet18, FPN of 64."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from slimnet.tasks.detection.data import SyntheticDetectionDataModule
from slimnet.tasks.detection.task import DetectionTask

TINY_FASTER_RCNN = {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 50,
                    "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 16}


def _dm(**kw):
    return SyntheticDetectionDataModule(image_size=64, train_size=8, val_size=4, test_size=4, batch_size=4,
                                        min_object_size=10, max_object_size=30, **kw)


def _trainer(**kw):
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                      **kw)


@pytest.mark.parametrize("kind", ["fasterrcnn", "retinanet", "fcos"])
def test_task_trains_and_reports_coco_map(single_thread, kind):
    pl.seed_everything(0, verbose=False)
    dm = _dm()
    config = dict(kind=kind, backbone="resnet18", num_classes=dm.num_classes, min_size=64, max_size=64,
                  fpn_channels=64, **(TINY_FASTER_RCNN if kind == "fasterrcnn" else {}))
    task = DetectionTask(config, image_size=64, warmup_steps=2)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    # the model summary is on: it runs example_input_array through the datamodule's batch hook
    trainer = _trainer(max_steps=2, limit_val_batches=1, limit_test_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)

    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    for key in ("val/map", "val/map_50"):
        assert 0.0 <= float(metrics[key]) <= 1.0, key
    moved = [n for n, p in task.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.body") for n in moved) and any("head" in n for n in moved)

    test = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert set(test) == {"test/map", "test/map_50"} and all(0.0 <= v <= 1.0 for v in test.values())


class _Oracle(nn.Module):
    """A stand-in detector that answers each image with its true boxes, and with the true labels or
    each label moved to the next class."""

    def __init__(self, dataset, num_classes: int, wrong_class: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # something for configure_optimizers
        self.pairs = [dataset[i] for i in range(len(dataset))]
        self.num_classes, self.wrong_class = num_classes, wrong_class

    def forward(self, images, targets=None):
        out = []
        for x in images:
            t = next(t for img, t in self.pairs if torch.equal(img, x))
            labels = t["labels"] % self.num_classes + 1 if self.wrong_class else t["labels"]  # 1..K -> 2..K, 1
            out.append({"boxes": t["boxes"], "scores": torch.ones(len(labels)), "labels": labels})
        return out


@pytest.mark.parametrize("wrong_class, expected", [(False, 1.0), (True, 0.0)], ids=["exact", "wrong_class"])
def test_map_is_one_for_exact_boxes_and_zero_for_wrong_classes(wrong_class, expected):
    """Boxes (xyxy) and labels (1..K) reach the metric as the data module made them."""
    dm = _dm()
    dm.setup("validate")
    oracle = _Oracle(dm.val_set, dm.num_classes, wrong_class)
    task = DetectionTask({"num_classes": dm.num_classes}, image_size=64, model=oracle)
    result = _trainer(enable_model_summary=False).validate(task, datamodule=dm, verbose=False)[0]
    assert result["val/map"] == pytest.approx(expected) and result["val/map_50"] == pytest.approx(expected)


def test_rebuilt_optimizer_continues_the_learning_rate_curve():
    """A slimming callback calls configure_optimizers again after the cut: the new schedule must pick
    up the curve at the current step, not restart the warm-up."""
    task = DetectionTask({"num_classes": 1}, image_size=64, lr=0.1, warmup_steps=10, model=nn.Linear(2, 2))
    fake = SimpleNamespace(global_step=0, estimated_stepping_batches=110)
    task.trainer = fake

    assert task.lr_factor(0) == pytest.approx(1e-3)
    assert task.lr_factor(10) == pytest.approx(1.0)  # warm-up done
    assert task.lr_factor(60) == pytest.approx(0.5)  # cosine half way
    assert task.lr_factor(110) == pytest.approx(0.0, abs=1e-12)

    fake.global_step = 60
    conf = task.configure_optimizers()
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(0.05)  # not 0.1 * 1e-3
    assert conf["lr_scheduler"]["interval"] == "step"
    fake.global_step = 61
    conf["optimizer"].step()  # (no gradients: only keeps torch from warning about the order)
    conf["lr_scheduler"]["scheduler"].step()
    assert conf["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * task.lr_factor(61))


def test_norms_and_biases_get_no_weight_decay():
    """Weight decay on BN γ would be a second sparsity pressure beside slimming's L1 term."""
    task = DetectionTask({"kind": "fcos", "num_classes": 2, "fpn_channels": 64}, image_size=64, weight_decay=1e-4)
    task.trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=10)
    groups = task.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    gamma = task.model.backbone.body.bn1.weight
    assert id(gamma) not in decayed and id(task.model.backbone.body.conv1.weight) in decayed
