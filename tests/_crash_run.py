"""Run ``train(cfg)`` and SIGKILL the process at a chosen epoch and batch (a real crash, not a stop).

    python tests/_crash_run.py <run_dir> <epoch> <batch> [hydra overrides...]
"""

from __future__ import annotations

import os
import signal
import sys

import pytorch_lightning as pl
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from slimnet.run.pipeline import train


class KillAt(pl.Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run_dir, epoch, batch, *overrides = sys.argv[1:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg, run_dir, extra_callbacks=[KillAt(int(epoch), int(batch))])
