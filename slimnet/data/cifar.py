"""CIFAR-10 / CIFAR-100 via torchvision's reader (downloaded on request), kept in memory as uint8."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slimnet.data.base import _BaseDataModule
from slimnet.data.dataset import TensorImageDataset
from slimnet.errors import DataNotFoundError, first_line

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class CIFARDataModule(_BaseDataModule):
    """CIFAR-10 or CIFAR-100 via torchvision's reader, kept in memory as uint8 tensors."""

    _STATS = {10: (CIFAR10_MEAN, CIFAR10_STD), 100: (CIFAR100_MEAN, CIFAR100_STD)}

    def __init__(
        self,
        root: str | None = "data/cifar",
        num_classes: int = 10,
        download: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | float = 5000,
        seed: int = 0,
        augment: bool = True,
        pad: int | None = None,
    ):
        if num_classes not in self._STATS:
            raise ValueError(f"CIFAR num_classes must be one of {sorted(self._STATS)}, got {num_classes!r}")
        super().__init__(root or "data/cifar", batch_size, num_workers, val_size, seed, augment, pad)
        self.download = bool(download)
        self.num_classes, self.in_channels, self.image_size = int(num_classes), 3, (32, 32)
        self.name = f"cifar{self.num_classes}"
        self.mean, self.std = self._STATS[self.num_classes]

    @property
    def _dataset_cls(self):
        from torchvision.datasets import CIFAR10, CIFAR100  # imported here: torchvision is slow to import

        return CIFAR10 if self.num_classes == 10 else CIFAR100

    def _not_found(self, reason: str) -> DataNotFoundError:
        cls = self._dataset_cls
        return DataNotFoundError(
            f"CIFAR-{self.num_classes} not found in {os.path.abspath(self.root)} ({reason}): download "
            f"{cls.url} and extract it there (giving {cls.base_folder}/), or set data.root to a folder "
            f"that has it"
        )

    def check(self) -> None:
        """Files present (by name; torchvision checks md5 on load), or downloaded now: an offline machine
        learns it before training, and no empty data folder is left behind."""
        cls = self._dataset_cls
        folder = Path(self.root) / cls.base_folder
        names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing and not self.download:
            raise self._not_found(f"missing {cls.base_folder}/{missing[0]} and download=False")
        if missing:
            created = [p for p in (Path(self.root), *Path(self.root).parents) if not p.exists()]
            try:
                self._open(train=True, download=True)
            except DataNotFoundError:
                for path in created:  # innermost first: only the folders this attempt made, if still empty
                    if path.is_dir() and not any(path.iterdir()):
                        path.rmdir()
                raise

    def _open(self, train: bool, download: bool):
        try:
            return self._dataset_cls(self.root, train=train, download=download)
        except Exception as err:  # URLError/OSError offline, RuntimeError for missing or bad md5
            raise self._not_found(first_line(err)) from err

    def prepare_data(self) -> None:
        # Lightning runs this on one process only: the place to download.
        if self.download:
            self._open(train=True, download=True)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._open(train=train, download=self.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW, uint8
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        self.check()
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._train_val(*self._load(train=True))
        if stage in (None, "test") and self.test_set is None:
            self.test_set = TensorImageDataset(*self._load(train=False), self.mean, self.std)
