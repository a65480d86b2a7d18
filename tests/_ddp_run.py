"""Run ``train(cfg)`` under DDP and have every rank dump its final model, so a test can compare ranks.

    python tests/_ddp_run.py <run_dir> [hydra overrides...]

Lightning's DDP launcher re-runs this script once per extra rank (LOCAL_RANK set in the environment).
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from slimnet.run.pipeline import train


class DumpRank(pl.Callback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}
        torch.save({"state_dict": state, "phase": pl_module.phase}, f"{self.run_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    run_dir, *overrides = sys.argv[1:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg, run_dir, extra_callbacks=[DumpRank(run_dir)])
