"""The built-in data sets by name (``conf/data/<name>.yaml`` sets ``name``): a dict, not an if/elif."""

from __future__ import annotations

import functools

from slimnet.data.base import _BaseDataModule
from slimnet.data.cifar import CIFARDataModule
from slimnet.data.fashion_mnist import FashionMNISTDataModule
from slimnet.data.imagefolder import ImageFolderDataModule
from slimnet.data.synthetic import SyntheticDataModule

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
