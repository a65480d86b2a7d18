"""Fashion-MNIST, the offline default: the four IDX files of the Debian package, or any folder holding them."""

from __future__ import annotations

from pathlib import Path

import torch

from slimnet.data.base import _BaseDataModule
from slimnet.data.dataset import TensorImageDataset
from slimnet.data.idx import _IDX_IMAGES, _IDX_LABELS, _idx_header, read_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package ``dataset-fashion-mnist``
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class FashionMNISTDataModule(_BaseDataModule):
    """Fashion-MNIST from the four IDX files (plain or .gz), parsed directly.

    We don't use ``torchvision.datasets.FashionMNIST`` because the Debian package
    (``/usr/share/datasets/fashion-mnist``, the default ``root``) ships recompressed .gz files whose
    md5 torchvision rejects; the IDX format is simple enough to read and validate ourselves.
    """

    name = "fashion_mnist"
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD

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
        super().__init__(root, batch_size, num_workers, val_size, seed, augment, pad)
        self.root = self.root or FASHION_MNIST_DIR
        self.num_classes, self.in_channels, self.image_size = 10, 1, (28, 28)

    def _path(self, key: str) -> Path:
        """The file for ``key``, preferring the plain file (no decompression) over the .gz."""
        base = Path(self.root) / _FMNIST_FILES[key]
        for candidate in (base, base.with_name(base.name + ".gz")):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {self.root} (missing {base.name}[.gz]): install it with "
            f"`apt-get install dataset-fashion-mnist` or point data.root at a folder with the IDX files"
        )

    def check(self) -> None:
        """All four files present with valid headers and matching counts (reads only the headers)."""
        for split in ("train", "test"):
            n_img, rows, cols = _idx_header(self._path(f"{split}_images"), _IDX_IMAGES)
            (n_lab,) = _idx_header(self._path(f"{split}_labels"), _IDX_LABELS)
            if (rows, cols) != self.image_size:
                raise ValueError(f"{self._path(f'{split}_images')}: images are {rows}x{cols}, expected 28x28")
            if n_img != n_lab:
                raise ValueError(
                    f"{self._path(f'{split}_images')}: {n_img} images but "
                    f"{self._path(f'{split}_labels')} has {n_lab} labels"
                )

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lab_path = self._path(f"{split}_images"), self._path(f"{split}_labels")
        images = read_idx(img_path, _IDX_IMAGES).unsqueeze(1)  # (N,1,28,28)
        labels = read_idx(lab_path, _IDX_LABELS).long()
        if len(images) != len(labels):
            raise ValueError(f"{img_path}: {len(images)} images but {lab_path} has {len(labels)} labels")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(f"{lab_path}: label {int(labels.max())} outside 0..{self.num_classes - 1}")
        return images, labels

    def prepare_data(self) -> None:
        self.check()  # nothing to download; fail early with the install hint instead

    def setup(self, stage: str | None = None) -> None:
        self.check()
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._train_val(*self._load("train"))
        if stage in (None, "test") and self.test_set is None:
            images, labels = self._load("test")
            self.test_set = TensorImageDataset(images, labels, self.mean, self.std)
