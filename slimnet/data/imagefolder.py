"""A user's ``root/<class>/<image>`` folders via ``torchvision.datasets.ImageFolder``."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from torch.utils.data import Dataset, Subset

from slimnet.data._util import _as_hw
from slimnet.data.base import _BaseDataModule
from slimnet.data.split import _split_indices

log = logging.getLogger(__name__)


class ImageFolderDataModule(_BaseDataModule):
    """``root/<class>/<image>`` folders via ``torchvision.datasets.ImageFolder``.

    Images are decoded, resized to ``image_size``, converted to RGB and normalised per sample in the
    loader workers (they don't fit in memory in general); flips and crops still run on the device.
    The validation split is held out from ``root``; the test set is ``test_root`` if given, else the
    validation split (with a warning, since then there is no untouched test set).
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str | None = None,
        image_size: int | Sequence[int] = (32, 32),
        val_size: int | float = 0.1,
        test_root: str | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        pad: int | None = None,
    ):
        super().__init__(root, batch_size, num_workers, val_size, seed, augment, pad)
        self.test_root = None if test_root is None else os.path.expanduser(str(test_root))
        self.image_size = _as_hw(image_size)
        self.in_channels = 3  # ImageFolder's loader converts every image to RGB
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        # The model needs num_classes before setup: list the class folders now (cheap, no decoding).
        self.classes = self._find_classes(self.root, "data.root")
        self.num_classes = len(self.classes)
        self._full: Dataset | None = None

    @staticmethod
    def _find_classes(root: str | None, key: str) -> list[str]:
        from torchvision.datasets.folder import find_classes

        if root is None or not os.path.isdir(root):
            raise FileNotFoundError(
                f"image folder {root!r} not found: set {key} to a directory with one sub-folder per class"
            )
        try:
            classes, _ = find_classes(root)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no class folders in {root}: set {key} to a directory with one sub-folder per class"
            ) from None
        return classes

    def _folder(self, root: str):
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        tf = transforms.Compose([
            transforms.Resize(self.image_size),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])
        return ImageFolder(root, transform=tf)

    def check(self) -> None:
        self._find_classes(self.root, "data.root")
        if self.test_root is not None:
            self._check_test_classes()

    def _check_test_classes(self) -> None:
        test_classes = self._find_classes(self.test_root, "data.test_root")
        if test_classes != self.classes:
            raise ValueError(
                f"class folders differ between {self.root} {self.classes} and {self.test_root} "
                f"{test_classes}: data.test_root needs the same class sub-folders as data.root"
            )

    def setup(self, stage: str | None = None) -> None:
        self.check()
        need_val = stage in (None, "fit", "validate") or (stage == "test" and self.test_root is None)
        if need_val and self.train_set is None:
            self._full = self._folder(self.root)
            train_idx, val_idx = _split_indices(len(self._full), self.val_size, self.seed)
            self.train_set = Subset(self._full, train_idx.tolist())
            self.val_set = Subset(self._full, val_idx.tolist())
        if stage in (None, "test") and self.test_set is None:
            if self.test_root is not None:
                self.test_set = self._folder(self.test_root)
            else:
                log.warning(
                    "ImageFolderDataModule: no data.test_root given, so the validation split doubles as "
                    "the test set; test scores are then not on unseen data"
                )
                self.test_set = self.val_set
