"""LightningDataModules for Fashion-MNIST, CIFAR-10/100, user image folders and a synthetic set.

Design, and why:

* Images are held in memory as ``uint8`` tensors (N, C, H, W), read once. A dataset item is the
  normalised float image and its label; ``__getitems__`` normalises a whole batch in one tensor op, so
  the loader costs about a quarter of what per-sample indexing does (which matters on 2 CPU cores).
* Training augmentation (random horizontal flip + random crop from a zero-padded image, as in the
  Network Slimming paper) runs per *batch*, vectorised, on the training device, in
  ``on_after_batch_transfer``; workers never decode PIL images or run per-sample transforms.
  Lightning calls that hook only when the datamodule is handed to the Trainer
  (``trainer.fit(model, datamodule=dm)``).
* Everything the model is built from (``num_classes``, ``in_channels``, ``image_size``, ``name``,
  ``example_input()``) is known right after ``__init__``, before any data is read.
* The validation split is held out from the *training* files with a fixed-seed generator, so it is
  the same on every run and the test files are only opened for ``stage="test"``.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package ``dataset-fashion-mnist``

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """In-memory images (uint8 or float, N x C x H x W) and int64 labels; items come out normalised.

    ``uint8`` images are scaled to [0, 1] first; float images (the synthetic set) are only normalised.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float]
    ):
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected images (N,C,H,W) and N labels, got {tuple(images.shape)} and {len(labels)}"
            )
        self.images = images
        self.labels = labels.long()
        # Shaped (C,1,1) so they broadcast over a single image and over a batch alike.
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std

    def __getitem__(self, index: int):
        return self._normalise(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]):
        # DataLoader's batched fetch: one gather + one normalisation per batch instead of per sample.
        # Returns a list of samples so the default collate (and Subset) keep working unchanged.
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._normalise(self.images[idx])
        return list(zip(x.unbind(0), self.labels[idx].unbind(0)))


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``32`` or ``(32, 32)`` -> ``(32, 32)`` (Hydra hands lists, so accept any 2-sequence)."""
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
    return size  # type: ignore[return-value]


def _default_pad(image_size: tuple[int, int]) -> int:
    """Crop padding: 4 px for 32x32-and-up images (the paper's CIFAR setting), 2 px for smaller ones."""
    return 4 if min(image_size) >= 32 else 2


def _num_val(val_size: int | float, n: int) -> int:
    """Turn ``val_size`` (a count, or a fraction of the ``n`` training images) into a count."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size fraction must be in [0, 1), got {val_size}")
        k = round(val_size * n)
    else:
        k = val_size
    if not 0 <= k < n:
        raise ValueError(
            f"val_size={val_size} leaves no training images out of {n}; set data.val_size below {n}"
        )
    return k


def _split_indices(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx) from a permutation of a private, seeded generator: same split every run,
    independent of the global RNG state that Lightning's ``seed_everything`` controls."""
    k = _num_val(val_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorted, so the in-memory gather walks memory in order; the train loader shuffles anyway.
    return perm[k:].sort().values, perm[:k].sort().values


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@torch.no_grad()
def random_flip_crop(
    x: torch.Tensor, pad: int, fill: torch.Tensor | float = 0.0, flip: bool = True
) -> torch.Tensor:
    """Per-sample random horizontal flip and random ``pad``-pixel shift of a batch (B, C, H, W).

    The shift is a random crop of the image padded by ``pad`` on each side with ``fill`` (per channel),
    done for the whole batch at once with one advanced-indexing gather. Randomness comes from the
    global generator of ``x``'s device, so ``torch.manual_seed`` makes it reproducible.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        fill = torch.as_tensor(fill, dtype=x.dtype, device=dev).reshape(1, -1, 1, 1)
        padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B,1,1,W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = torch.rand(b, device=dev) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


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
            shuffle=shuffle,
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


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # uint8 data, 3 dims / 1 dim
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(path: Path, magic: int) -> tuple[int, ...]:
    """Read and check an IDX header (magic, then one big-endian int32 per dim) without reading data."""
    ndim = magic & 0xFF
    try:
        with _idx_open(path) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: not a readable IDX file ({_one_line(err)})") from None
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    (got,) = struct.unpack(">i", head[:4])
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
    return struct.unpack(f">{ndim}i", head[4:])


def read_idx(path: str | os.PathLike, magic: int) -> torch.Tensor:
    """Parse a uint8 IDX file (plain or .gz) into a tensor shaped by its header dims."""
    path = Path(path)
    dims = _idx_header(path, magic)
    offset = 4 + 4 * len(dims)
    try:
        with _idx_open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated .gz fails here with EOFError
        raise ValueError(f"{path}: corrupt IDX file ({_one_line(err)})") from None
    expected = offset + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: truncated or corrupt IDX file ({len(raw)} bytes, header implies {expected})"
        )
    # bytearray: torch.frombuffer wants a writable buffer; one copy of the file, then a view.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).view(*dims)


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


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------------------------------


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

    def _not_found(self, reason: str) -> RuntimeError:
        cls = self._dataset_cls
        return RuntimeError(
            f"CIFAR-{self.num_classes} not found in {os.path.abspath(self.root)} ({reason}): download "
            f"{cls.url} and extract it there (giving {cls.base_folder}/), or set data.root to a folder "
            f"that has it"
        )

    def check(self) -> None:
        """Files present (by name; torchvision checks md5 on load), or a download is allowed."""
        cls = self._dataset_cls
        folder = Path(self.root) / cls.base_folder
        names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing and not self.download:
            raise self._not_found(f"missing {cls.base_folder}/{missing[0]} and download=False")

    def _open(self, train: bool, download: bool):
        try:
            return self._dataset_cls(self.root, train=train, download=download)
        except Exception as err:  # URLError/OSError offline, RuntimeError for missing or bad md5
            raise self._not_found(_one_line(err)) from err

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


# --------------------------------------------------------------------------------------------------
# User image folders
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

DATAMODULES = {
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": functools.partial(CIFARDataModule, num_classes=10),
    "cifar100": functools.partial(CIFARDataModule, num_classes=100),
    "imagefolder": ImageFolderDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(name: str, **kwargs) -> _BaseDataModule:
    """Build the datamodule a config names, e.g. ``build_datamodule("cifar10", batch_size=64)``."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATAMODULES)}")
    factory = DATAMODULES[name]
    # cifar10/cifar100 preset num_classes; a config contradicting the name is a mistake, not an override.
    preset = getattr(factory, "keywords", {})
    for key, value in preset.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"dataset {name!r} fixes {key}={value}, but the config sets {key}={kwargs[key]}")
    return factory(**kwargs)
