"""LightningDataModules for Fashion-MNIST, CIFAR-10/100, user image folders and a synthetic set.

    from slimnet.data import build_datamodule
    dm = build_datamodule("cifar10", batch_size=64)      # or FashionMNISTDataModule(root=...), ...

One idea a file:

* ``base``          -- ``_BaseDataModule``: loaders, the seeded split, on-device augmentation hook
* ``dataset``       -- ``TensorImageDataset``: in-memory uint8 images, normalised a batch at a time
* ``split``         -- the fixed-seed validation split held out from the training files
* ``sampler``       -- ``EpochShuffle``: each epoch's training order from (seed, epoch) alone
* ``transforms``    -- ``random_flip_crop``: the paper's flip + padded crop, vectorised per batch
* ``idx``           -- ``read_idx``: the IDX file format (plain or .gz), validated
* ``fashion_mnist`` -- ``FashionMNISTDataModule`` (the offline default)
* ``cifar``         -- ``CIFARDataModule`` (CIFAR-10 / CIFAR-100)
* ``imagefolder``   -- ``ImageFolderDataModule`` (``root/<class>/<image>``)
* ``synthetic``     -- ``SyntheticDataModule`` (tiny, learnable, for tests)
* ``registry``      -- ``DATAMODULES`` and ``build_datamodule(name, **kwargs)``

A user's own LightningDataModule (``data=custom data._target_=...``) is handled by ``slimnet.data.custom``.
Everything that ``slimnet/data.py`` offered before the split is importable from here unchanged.
"""

from slimnet.data.base import _BaseDataModule
from slimnet.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CIFARDataModule
from slimnet.data.dataset import TensorImageDataset
from slimnet.data.fashion_mnist import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTDataModule,
)
from slimnet.data.idx import read_idx
from slimnet.data.imagefolder import ImageFolderDataModule
from slimnet.data.registry import DATAMODULES, build_datamodule
from slimnet.data.synthetic import SyntheticDataModule
from slimnet.data.transforms import random_flip_crop

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATAMODULES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CIFARDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
    "_BaseDataModule",
    "build_datamodule",
    "random_flip_crop",
    "read_idx",
]
