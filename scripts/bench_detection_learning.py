"""How fast a small detector learns the synthetic detection set on this CPU: val mAP after each epoch.

    python scripts/bench_detection_learning.py                          # FCOS, resnet18, FPN 64, 128 px
    python scripts/bench_detection_learning.py --kind fasterrcnn --epochs 6 --lr 0.02 --threads 2

No pruning: this measures the task and the data alone (the baseline a slimmed run is compared to).
Prints one line per epoch (val mAP@[.5:.95], mAP@.5, wall time since start) and the test mAP at the end.

Measured on this 2-core host while two other jobs kept it at a load of 6-7 (one thread each), resnet18,
FPN 64, 128 px, 512 training images, batch 8, 6 epochs = 384 steps, random init:
  --kind fcos --lr 0.02        test mAP 0.037, mAP@.5 0.113 in 16.5 min (val mAP 0.004 after epoch 1)
  --kind fasterrcnn --lr 0.02  test mAP 0.154, mAP@.5 0.303 in 21.5 min (val mAP 0.074 after epoch 4 of 6)
  --kind fcos --lr 0.01        val mAP 0.007 after 3 epochs (stopped)
  --kind fasterrcnn --lr 0.02 --epochs 12 (768 steps): val mAP 0.094 / 0.194 / 0.372 / 0.461 / 0.490 after
      epochs 4 / 5 / 7 / 9 / 11; test mAP 0.519, mAP@.5 0.760 in 34.7 min (epochs took 130-220 s here)
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch

from slimnet.tasks.detection.data import SyntheticDetectionDataModule
from slimnet.tasks.detection.task import DetectionTask

# Faster R-CNN's defaults are sized for 800 px COCO images: 2000/1000 proposals and 512 RoIs an image
# would make its RoI head 80% of the cost on 128 px images with ~3 objects.
SMALL_FASTER_RCNN = {"rpn_pre_nms_top_n_train": 500, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 300,
                     "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 128}


class _EpochLine(pl.Callback):
    def __init__(self):
        self.start = time.time()

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation and its logging
        m = trainer.callback_metrics
        print(f"epoch {trainer.current_epoch}: train/loss {float(m['train/loss']):.3f}  val/map "
              f"{float(m['val/map']):.3f}  val/map_50 {float(m['val/map_50']):.3f}  {time.time() - self.start:.0f} s",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="fcos")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--fpn-channels", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--score-thresh", type=float, default=0.05, help="detections kept for mAP (FCOS's default 0.2 "
                    "hides the low-confidence boxes of an early model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    dm = SyntheticDetectionDataModule(image_size=128, train_size=args.train_size, val_size=128, test_size=128,
                                      batch_size=args.batch_size, seed=args.seed)
    extra = SMALL_FASTER_RCNN if args.kind == "fasterrcnn" else {"score_thresh": args.score_thresh}
    config = dict(kind=args.kind, backbone=args.backbone, num_classes=dm.num_classes, min_size=128, max_size=128,
                  fpn_channels=args.fpn_channels, anchor_scale=4 if args.kind == "fasterrcnn" else None, **extra)
    task = DetectionTask(config, image_size=128, lr=args.lr, warmup_steps=100)
    print(f"{args.kind} {args.backbone} fpn {args.fpn_channels}: {task.flops()['total'] / 1e9:.2f} GFLOPs at 128 px, "
          f"{args.epochs} epochs of {args.train_size // args.batch_size} steps", flush=True)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_EpochLine()])
    start = time.time()
    trainer.fit(task, datamodule=dm)
    test = trainer.test(task, datamodule=dm, verbose=False)[0]
    print(f"test/map {test['test/map']:.3f}  test/map_50 {test['test/map_50']:.3f}  total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
