"""A tiny learnable synthetic set for tests and smoke runs (no files, fully determined by ``seed``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimnet.data._util import _as_hw
from slimnet.data.base import _BaseDataModule
from slimnet.data.dataset import TensorImageDataset


class SyntheticDataModule(_BaseDataModule):
    """A tiny learnable dataset for tests: each class is a fixed random prototype image plus noise.

    Prototypes are low-frequency (a 4x4 random pattern upsampled) and left-right symmetric, so the
    flip/crop augmentation barely changes them and a small network separates the classes in a few
    steps. Labels are balanced (round robin, then shuffled). Fully determined by ``seed``.
    """

    name = "synthetic"

    def __init__(
        self,
        root: str | None = None,
        num_classes: int = 4,
        in_channels: int = 3,
        image_size: int | Sequence[int] = (16, 16),
        train_size: int = 256,
        val_size: int = 64,
        test_size: int = 64,
        noise: float = 0.5,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        pad: int | None = None,
    ):
        super().__init__(root, batch_size, num_workers, val_size, seed, augment, pad)
        if num_classes < 2 or in_channels < 1 or train_size < 1 or val_size < 0 or test_size < 0:
            raise ValueError(
                "synthetic data needs num_classes >= 2, in_channels >= 1, train_size >= 1, "
                f"val_size/test_size >= 0; got {num_classes}, {in_channels}, {train_size}, {val_size}, "
                f"{test_size}"
            )
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.image_size = _as_hw(image_size)
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.noise = float(noise)
        self.mean, self.std = (0.0,) * self.in_channels, (1.0,) * self.in_channels  # data already ~N(0,1)

    def _generate(self) -> dict[str, TensorImageDataset]:
        """All three splits from one seeded generator, so each split is the same whatever stage runs."""
        g = torch.Generator().manual_seed(self.seed)
        c, (h, w) = self.in_channels, self.image_size
        low = torch.randn(self.num_classes, c, 4, 4, generator=g)
        protos = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        protos = (protos + protos.flip(-1)) / 2  # mirror-symmetric: a flip keeps the class look
        protos = (protos - protos.mean()) / protos.std()
        out = {}
        for split, n in self.sizes.items():
            labels = (torch.arange(n) % self.num_classes)[torch.randperm(n, generator=g)]
            images = protos[labels] + self.noise * torch.randn(n, c, h, w, generator=g)
            out[split] = TensorImageDataset(images, labels, self.mean, self.std)
        return out

    def setup(self, stage: str | None = None) -> None:
        data = self._generate()
        if stage in (None, "fit", "validate"):
            self.train_set, self.val_set = data["train"], data["val"]
        if stage in (None, "test"):
            self.test_set = data["test"]
