"""Your own LightningDataModule in the CLI: build it from ``_target_`` and learn what the run needs.

A run needs three facts beyond Lightning's API: an example input (its shape, for tracing and FLOPs),
the input channels and the number of classes. slimnet's own data modules state them; a user's module is
asked first (``num_classes`` / ``classes``, ``in_channels``), and whatever it does not say is derived
from its first training batch, never from an unwritten contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from slimnet.errors import DataError
from slimnet.locate import locate


@dataclass
class DataFacts:
    example: torch.Tensor        # one input, (1, C, H, W)
    in_channels: int
    num_classes: int | None      # None: the module does not say (the model's output may)


def build_custom_datamodule(config: dict) -> pl.LightningDataModule:
    target = config["_target_"]
    dm = locate(target)(**{k: v for k, v in config.items() if k != "_target_"})
    if not isinstance(dm, pl.LightningDataModule):
        raise DataError(f"data._target_={target} built a {type(dm).__name__}, not a LightningDataModule")
    if hasattr(dm, "check"):
        dm.check()  # a module that can check its files (slimnet's own do): missing or corrupt data fails now
    return dm


def _num_classes(dm) -> int | None:
    n = getattr(dm, "num_classes", None)
    if n is None and getattr(dm, "classes", None) is not None:
        n = len(dm.classes)
    return int(n) if n is not None else None


def describe(dm: pl.LightningDataModule) -> DataFacts:
    """The facts of ``dm``; a user's module is set up for fitting here (Lightning does it again later)."""
    name = type(dm).__name__
    if hasattr(dm, "example_input") and hasattr(dm, "in_channels"):  # slimnet's own modules say everything
        return DataFacts(dm.example_input(1), dm.in_channels, dm.num_classes)
    dm.prepare_data()
    dm.setup("fit")
    try:
        batch = next(iter(dm.train_dataloader()))
    except StopIteration:
        raise DataError(f"{name}.train_dataloader() is empty; the run has nothing to train on") from None
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
        raise DataError(f"{name} yields batches of type {type(batch).__name__}; the classification task needs "
                        "(images, labels) pairs: return (x, y) from the dataset, or slim your own LightningModule "
                        "with slimnet.SparsityCallback and slimnet.SlimmingCallback")
    x = batch[0]
    if x.dim() < 2:
        raise DataError(f"{name}'s images have shape {tuple(x.shape)}; expected (batch, channels, ...)")
    in_channels = getattr(dm, "in_channels", None) or x.shape[1]
    return DataFacts(x[:1].detach().clone().float(), int(in_channels), _num_classes(dm))
