"""A user's own LightningModule, data module and network, written with no knowledge of slimnet:
dict batches, a dict loss, AdamW with a step schedule. Used by test_own_module.py, in-process and as

    python tests/_own_module.py <run_dir> <kill_at_epoch|-1> [resume]

which trains with slimnet's two callbacks and SIGKILLs itself at the start of that epoch."""

from __future__ import annotations

import os
import signal
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import slimnet

EPOCHS, CUT = 5, 2


class Shapes(Dataset):
    """Four learnable classes: a bright quadrant on noise."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
        for i, c in enumerate(self.y.tolist()):
            self.x[i, :, (c // 2) * 8:(c // 2) * 8 + 8, (c % 2) * 8:(c % 2) * 8 + 8] += 1.0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class ShapesData(pl.LightningDataModule):
    def setup(self, stage=None):
        self.train_set, self.val_set = Shapes(128, 0), Shapes(64, 1)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32)  # no shuffle: a resumed run sees the same batches

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.body(x))


class UserModule(pl.LightningModule):
    def __init__(self, width: int = 16, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = Net(width)
        self.example_input_array = torch.zeros(1, 3, 16, 16)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return {"loss": F.cross_entropy(self(batch["image"]), batch["label"])}

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch["image"]), batch["label"]))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)}


class SlimmableUserModule(slimnet.Slimmable, UserModule):
    """The one-line opt-in that makes Lightning's own load_from_checkpoint rebuild the cut widths."""


class KillAtEpoch(pl.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def callbacks(run_dir) -> list[pl.Callback]:
    return [slimnet.SparsityCallback(lam=5e-2, until_epoch=CUT),
            slimnet.SlimmingCallback(epoch=CUT, percent=0.5, module="net"),
            pl.callbacks.ModelCheckpoint(dirpath=f"{run_dir}/checkpoints", filename="last", save_top_k=1,
                                         monitor=None, enable_version_counter=False)]


def fit(run_dir, extra=(), ckpt_path=None) -> tuple[UserModule, pl.Trainer]:
    pl.seed_everything(0)
    module = UserModule()
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=callbacks(run_dir) + list(extra), logger=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="auto",
                         default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=ShapesData(), ckpt_path=ckpt_path)
    return module, trainer


if __name__ == "__main__":
    run_dir, kill_at, *resume = sys.argv[1:]
    extra = [KillAtEpoch(int(kill_at))] if int(kill_at) >= 0 else []
    fit(run_dir, extra, ckpt_path=f"{run_dir}/checkpoints/last.ckpt" if resume else None)
