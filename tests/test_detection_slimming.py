"""The detection task under the generic callbacks, as the CLI will wire them: a detector whose norms
stay on their running statistics (norm_eval, as with a pretrained backbone) is sparsity-trained, cut at
an epoch inside the scope the task names, fine-tuned, saved and reloaded at its cut widths; the heads
and their class outputs keep their widths."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from slimnet.loops.lightning.checkpoint import load_checkpoint
from slimnet.loops.lightning.slimming_callback import SlimmingCallback
from slimnet.loops.lightning.sparsity_callback import SparsityCallback
from slimnet.sparsity.norms import EvalModeBatchNorm2d
from slimnet.tasks.detection.data import SyntheticDetectionDataModule
from slimnet.tasks.detection.task import DetectionTask


def _widths(module: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


def test_fcos_backbone_is_cut_at_the_epoch_keeps_training_and_reloads(single_thread, tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = SyntheticDetectionDataModule(image_size=64, train_size=8, val_size=4, test_size=4, batch_size=4,
                                      min_object_size=10, max_object_size=30)
    config = {"kind": "fcos", "backbone": "resnet18", "num_classes": dm.num_classes, "min_size": 64,
              "max_size": 64, "fpn_channels": 64, "norm": "batchnorm_eval"}
    task = DetectionTask(config, image_size=64, warmup_steps=2)
    scope = task.prune_scope("backbone")
    flops_before = task.flops()
    heads_before = _widths(task.model.head)
    body_before = _widths(task.model.backbone.body)

    slimming = SlimmingCallback(epoch=1, percent=0.3, module=scope.module)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, accelerator="cpu",
                         callbacks=[SparsityCallback(lam=1e-4, until_epoch=1, module=scope.module), slimming])
    trainer.fit(task, datamodule=dm)

    assert slimming.done
    flops_after = task.flops()
    assert flops_after["backbone"] < 0.9 * flops_before["backbone"]  # the body was really cut
    assert flops_after["heads"] == flops_before["heads"] and _widths(task.model.head) == heads_before
    body_after = _widths(task.model.backbone.body)
    assert any(body_after[n][1] < body_before[n][1] for n in body_before)
    # the norms stayed in eval mode through fit and surgery, and the converted γ trained
    norms = [m for m in task.model.backbone.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is EvalModeBatchNorm2d and m.weight.requires_grad for m in norms)
    assert 0.0 <= float(trainer.callback_metrics["val/map"]) <= 1.0  # validated after the cut
    task.eval()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (out,) = task([image])
    assert set(out) == {"boxes", "scores", "labels"}

    # a checkpoint of the cut run rebuilds the cut widths from the config alone (Slimmable)
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    reloaded = load_checkpoint(tmp_path / "cut.ckpt", DetectionTask)
    assert _widths(reloaded.model.backbone.body) == body_after
    with torch.no_grad():
        (again,) = reloaded([image])
    torch.testing.assert_close(again["scores"], out["scores"])
