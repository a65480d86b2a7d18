"""The base of the built-in data modules: loaders, the seeded validation split, on-device augmentation.

The training loader shuffles anew each epoch from ``(data.seed, epoch)`` (``sampler.EpochShuffle``); the
augmentation draws from torch's global generator, which ``seed_everything`` seeds and checkpoints carry.

Everything the model is built from (``num_classes``, ``in_channels``, ``image_size``, ``name``,
``example_input()``) is known right after ``__init__``, before any data is read. Training augmentation
runs per batch on the device in ``on_after_batch_transfer``; Lightning calls that hook only when the
datamodule is handed to the Trainer (``trainer.fit(model, datamodule=dm)``).
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from slimnet.data.dataset import TensorImageDataset
from slimnet.data.sampler import EpochShuffle
from slimnet.data.split import _split_indices
from slimnet.data.transforms import _default_pad, random_flip_crop


class _BaseDataModule(pl.LightningDataModule):
    """Loaders, the seeded validation split and the on-device augmentation shared by all datasets.

    Subclasses set ``name``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``, ``std`` in
    ``__init__`` and fill ``train_set`` / ``val_set`` / ``test_set`` in ``setup``.
    """

    name: str = ""
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 5000,
        seed: int = 0,
        augment: bool = True,
        pad: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = None if root is None else os.path.expanduser(str(root))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.val_size = val_size
        self.seed = int(seed)
        self.augment = bool(augment)
        self._pad = pad  # resolved lazily: image_size is only known once the subclass has set it
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- facts about the data ------------------------------------------------------------------------

    @property
    def pad(self) -> int:
        return _default_pad(self.image_size) if self._pad is None else int(self._pad)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A zero batch shaped like the model's input, for FLOPs counting and tracing."""
        return torch.zeros(batch, self.in_channels, *self.image_size)

    def check(self) -> None:
        """Cheaply verify the data can be loaded (no full read), so training fails before it starts."""

    # -- loaders ------------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset | None, shuffle: bool, stage: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}: call setup('{stage}') before asking for its dataloader"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # the training order depends on (seed, epoch) only, never on what drew from torch's generator
            sampler=EpochShuffle(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # don't re-fork workers every epoch
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, stage="fit")

    def val_dataloader(self):
        if self.val_set is not None and len(self.val_set) == 0:
            return []  # val_size=0: train on every training image; Lightning skips validation
        return self._loader(self.val_set, shuffle=False, stage="validate")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, stage="test")

    # -- augmentation -------------------------------------------------------------------------------

    def _fill(self) -> torch.Tensor:
        # "Zero padding" means black pixels, as with RandomCrop(padding=...) before Normalize; our
        # images are already normalised, so black is (0 - mean) / std per channel, not 0.
        return -torch.tensor(self.mean) / torch.tensor(self.std)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not (self.augment and self.trainer is not None and self.trainer.training):
            return batch
        x, y = batch
        x = random_flip_crop(x, self.pad, self._fill().to(x.device, x.dtype))
        return type(batch)((x, y)) if isinstance(batch, (list, tuple)) else (x, y)

    # -- split --------------------------------------------------------------------------------------

    def _train_val(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        train_idx, val_idx = _split_indices(len(labels), self.val_size, self.seed)
        self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], self.mean, self.std)
        self.val_set = TensorImageDataset(images[val_idx], labels[val_idx], self.mean, self.std)
