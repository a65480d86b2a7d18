"""Tests for slimnet.data: IDX/CIFAR/ImageFolder/synthetic loading, splits, augmentation, registry.

All data is written to tmp_path in the real on-disk formats; nothing touches the network.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from slimnet import data as D
from slimnet.data import (
    DATAMODULES,
    CIFARDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    build_datamodule,
    random_flip_crop,
)

# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 50, 20


def write_idx(path, magic: int, array: np.ndarray, gz: bool) -> str:
    """Write ``array`` (uint8) as an IDX file: big-endian magic, one >i4 per dim, then the bytes."""
    payload = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path = str(path) + (".gz" if gz else "")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)
    return path


def make_fmnist(folder, gz: bool = False, n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict:
    """Tiny IDX set whose pixels identify each image: [0,0] = index, [0,1] = 0 for train / 1 for test."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n, marker in (("train", n_train, 0), ("t10k", n_test, 1)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        images[:, 0, 1] = marker
        labels = (np.arange(n) % 10).astype(np.uint8)
        out[f"{split}_images"] = write_idx(folder / f"{split}-images-idx3-ubyte", 0x803, images, gz)
        out[f"{split}_labels"] = write_idx(folder / f"{split}-labels-idx1-ubyte", 0x801, labels, gz)
        out[f"{split}_arrays"] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_fmnist_loads_tiny_idx(tmp_path, gz):
    files = make_fmnist(tmp_path, gz=gz)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=10, batch_size=16)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.name) == (10, 1, (28, 28), "fashion_mnist")
    dm.check()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (40, 10)
    assert dm.test_set is None  # test files are only read for stage "test"

    x, y = dm.train_set[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Items are normalised with the Fashion-MNIST constants.
    raw = dm.train_set.images[0].float() / 255
    torch.testing.assert_close(x, (raw - 0.2860) / 0.3530)

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 28, 28) and xb.dtype == torch.float32 and yb.shape == (16,)

    # Each training image keeps its own label, and labels are 0..9.
    train_imgs, train_labels = files["train_arrays"]
    for ds in (dm.train_set, dm.val_set):
        ids = ds.images[:, 0, 0, 0].long()
        assert torch.equal(ds.labels, torch.from_numpy(train_labels.astype(np.int64))[ids])
        assert torch.equal(ds.images[:, 0], torch.from_numpy(train_imgs)[ids])
        assert (ds.images[:, 0, 0, 1] == 0).all()  # train/val come from the train files only
        assert 0 <= int(ds.labels.min()) and int(ds.labels.max()) <= 9

    train_ids = set(dm.train_set.images[:, 0, 0, 0].tolist())
    val_ids = set(dm.val_set.images[:, 0, 0, 0].tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(N_TRAIN))

    dm.setup("test")
    assert len(dm.test_set) == N_TEST
    assert (dm.test_set.images[:, 0, 0, 1] == 1).all()  # test set only from the t10k files
    assert sorted(dm.test_set.images[:, 0, 0, 0].tolist()) == list(range(N_TEST))


def test_fmnist_val_split_deterministic(tmp_path):
    make_fmnist(tmp_path)

    def val_ids(seed, val_size=10):
        dm = FashionMNISTDataModule(root=str(tmp_path), val_size=val_size, seed=seed)
        dm.setup("fit")
        return dm.val_set.images[:, 0, 0, 0].tolist()

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)
    torch.manual_seed(123)  # the split ignores the global RNG
    assert val_ids(0) == val_ids(0)
    assert len(val_ids(0, val_size=0.2)) == 10  # a float is a fraction of the training images


def test_fmnist_test_stage_alone_reads_only_test_files(tmp_path):
    make_fmnist(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path))  # default val_size 5000 > 50: never evaluated here
    dm.setup("test")
    assert dm.train_set is None and dm.val_set is None and len(dm.test_set) == N_TEST


def test_fmnist_val_size_too_large(tmp_path):
    make_fmnist(tmp_path)
    with pytest.raises(ValueError, match="data.val_size"):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")  # 5000 of 50


@pytest.mark.parametrize("missing", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_fmnist_missing_file(tmp_path, missing):
    files = make_fmnist(tmp_path)
    os.remove(next(p for p in files.values() if isinstance(p, str) and p.endswith(missing)))
    dm = FashionMNISTDataModule(root=str(tmp_path))  # constructing never touches the files
    for call in (dm.check, lambda: dm.setup("fit")):
        with pytest.raises(FileNotFoundError) as exc:
            call()
        msg = str(exc.value)
        assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
        assert missing in msg and str(tmp_path) in msg and "\n" not in msg


def test_fmnist_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere")).setup("fit")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_fmnist_bad_magic(tmp_path, gz):
    files = make_fmnist(tmp_path, gz=gz)
    labels = files["train_arrays"][1]
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte", 0x803, labels, gz)  # image magic on labels
    with pytest.raises(ValueError, match="magic") as exc:
        FashionMNISTDataModule(root=str(tmp_path), val_size=10).setup("fit")
    assert bad in str(exc.value)


def test_fmnist_truncated_plain(tmp_path):
    files = make_fmnist(tmp_path)
    path = files["train_images"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=10)
    dm.check()  # headers are fine; only a full read sees the missing bytes
    with pytest.raises(ValueError, match="truncated") as exc:
        dm.setup("fit")
    assert path in str(exc.value)


def test_fmnist_truncated_gz(tmp_path):
    files = make_fmnist(tmp_path, gz=True)
    path = files["t10k_images"]
    blob = Path(path).read_bytes()
    Path(path).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError) as exc:
        FashionMNISTDataModule(root=str(tmp_path)).setup("test")
    assert path in str(exc.value)


def test_fmnist_count_mismatch(tmp_path):
    files = make_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", 0x801, files["train_arrays"][1][:-1], gz=False)
    with pytest.raises(ValueError, match="49 labels"):
        FashionMNISTDataModule(root=str(tmp_path)).check()


def test_fmnist_prefers_plain_over_gz(tmp_path):
    make_fmnist(tmp_path, gz=True, n_train=30)
    make_fmnist(tmp_path, gz=False, n_train=40)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=0)
    dm.setup("fit")
    assert len(dm.train_set) == 40


@pytest.mark.skipif(not os.path.isdir(D.FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fmnist_real_default():
    dm = FashionMNISTDataModule()  # root=None -> the Debian package folder
    assert dm.root == D.FASHION_MNIST_DIR
    dm.check()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) + len(dm.val_set) == 60000 and len(dm.val_set) == 5000
    assert len(dm.test_set) == 10000
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.images.shape[1:] == (1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.min() == 0 and ds.labels.max() == 9
    # Per-class counts of the real data: 6000 train and 1000 test images per class.
    counts = torch.bincount(torch.cat([dm.train_set.labels, dm.val_set.labels]), minlength=10)
    assert counts.tolist() == [6000] * 10
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    # The normalisation constants fit the data: normalised training pixels are ~zero-mean, unit-std.
    x = (dm.train_set.images[:20000].float() / 255 - 0.2860) / 0.3530
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.02


# --------------------------------------------------------------------------------------------------
# CIFAR (torchvision's pickled-batch format)
# --------------------------------------------------------------------------------------------------


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(n: int, marker: int, start: int) -> np.ndarray:
    """(n, 3072) rows, channel planes R|G|B: R = image id, G = 100 + row index, B = split marker."""
    img = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    img[:, 0] = (start + np.arange(n))[:, None, None]
    img[:, 1] = 100 + np.arange(32)[None, :, None]
    img[:, 2] = marker
    return img.reshape(n, 3072)


def make_cifar10(root, per_batch: int = 6, n_test: int = 10):
    # Real CIFAR pickles come from Python 2; torchvision loads them with encoding="latin1", which turns
    # their keys into str. So the keys are str here ("data"), not bytes (b"data").
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(5):
        n0 = i * per_batch
        labels = [(n0 + j) % 10 for j in range(per_batch)]
        _pickle(folder / f"data_batch_{i + 1}", {"data": _cifar_images(per_batch, 0, n0), "labels": labels})
    test = {"data": _cifar_images(n_test, 1, 0), "labels": [j % 10 for j in range(n_test)]}
    _pickle(folder / "test_batch", test)
    _pickle(folder / "batches.meta", {"label_names": [f"c{k}" for k in range(10)]})


def make_cifar100(root, n_train: int = 30, n_test: int = 10):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, marker in (("train", n_train, 0), ("test", n_test, 1)):
        fine = [(j * 7) % 100 for j in range(n)]
        fine[-1] = 99
        coarse = [f // 5 for f in fine]
        entry = {"data": _cifar_images(n, marker, 0), "fine_labels": fine, "coarse_labels": coarse}
        _pickle(folder / name, entry)
    _pickle(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)]})


@pytest.fixture
def no_cifar_md5(monkeypatch):
    """Make torchvision accept our small CIFAR files.

    torchvision verifies every file against the md5 in the class attributes ``train_list``,
    ``test_list`` and ``meta`` (both in ``_check_integrity`` and in ``_load_meta``). Its
    ``check_integrity(path, md5=None)`` only checks the file exists, so we blank the md5s: the real
    loading code still runs, including "file missing" detection.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    for cls in (CIFAR10, CIFAR100):
        monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


def test_cifar10_loads(tmp_path, no_cifar_md5):
    make_cifar10(tmp_path)
    dm = CIFARDataModule(root=str(tmp_path), download=False, val_size=5, batch_size=8)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.name) == (10, 3, (32, 32), "cifar10")
    dm.check()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.test_set) == (25, 5, None)
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[2], torch.full((32, 32), (0 / 255 - 0.4465) / 0.2616))  # blue = marker 0

    for ds in (dm.train_set, dm.val_set):
        imgs = ds.images
        assert imgs.shape[1:] == (3, 32, 32) and imgs.dtype == torch.uint8
        # HWC -> CHW done right: each channel plane is what we wrote for it.
        ids = imgs[:, 0, 0, 0].long()
        assert (imgs[:, 0] == ids[:, None, None].to(torch.uint8)).all()
        assert (imgs[:, 1] == (100 + torch.arange(32)).to(torch.uint8)[None, :, None]).all()
        assert (imgs[:, 2] == 0).all()
        assert torch.equal(ds.labels, ids % 10)
    all_ids = torch.cat([dm.train_set.images[:, 0, 0, 0], dm.val_set.images[:, 0, 0, 0]]).tolist()
    assert sorted(all_ids) == list(range(30))  # disjoint, covering all five training batches

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and int(yb.max()) <= 9

    dm.setup("test")
    assert len(dm.test_set) == 10 and (dm.test_set.images[:, 2] == 1).all()
    assert 0 <= int(dm.test_set.labels.min()) and int(dm.test_set.labels.max()) <= 9


def test_cifar100_loads(tmp_path, no_cifar_md5):
    make_cifar100(tmp_path)
    dm = build_datamodule("cifar100", root=str(tmp_path), download=False, val_size=0.2)
    assert (dm.num_classes, dm.name, dm.mean) == (100, "cifar100", D.CIFAR100_MEAN)
    dm.setup(None)  # all splits at once
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 10)
    assert dm.train_set[0][0].shape == (3, 32, 32)
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert int(labels.min()) >= 0 and int(labels.max()) == 99  # fine labels, not coarse


def test_cifar_missing_no_download(tmp_path):
    root = tmp_path / "empty"
    dm = CIFARDataModule(root=str(root), download=False)
    for call in (dm.check, lambda: dm.setup("fit")):
        with pytest.raises(RuntimeError) as exc:
            call()
        msg = str(exc.value)
        assert str(root) in msg and "data.root" in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg


def test_cifar_download_fails_offline(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    dm = CIFARDataModule(root=str(tmp_path / "data" / "c"), num_classes=100, download=True)
    for call in (dm.check, dm.prepare_data):  # check() tries the download now, before any training
        with pytest.raises(RuntimeError) as exc:
            call()
        msg = str(exc.value)
        assert "CIFAR-100" in msg and str(tmp_path / "data" / "c") in msg and "name resolution" in msg
        assert "\n" not in msg
    assert not (tmp_path / "data").exists()  # the folders the failed download made are gone again


def test_cifar_corrupt_files_rejected(tmp_path):
    make_cifar10(tmp_path)  # present, but md5s don't match torchvision's (no fixture here)
    dm = CIFARDataModule(root=str(tmp_path), download=False)
    dm.check()  # names present
    with pytest.raises(RuntimeError, match="corrupted"):
        dm.setup("fit")


def test_cifar_bad_num_classes():
    with pytest.raises(ValueError, match=r"\[10, 100\]"):
        CIFARDataModule(num_classes=20)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def _reference_flip_crop(img, pad, fill):
    """All (flip, dy, dx) variants of one image, computed the slow obvious way."""
    c, h, w = img.shape
    padded = fill.view(-1, 1, 1).expand(c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, pad : pad + h, pad : pad + w] = img
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


def _batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_augment_only_when_training():
    dm = SyntheticDataModule(batch_size=16)
    batch = _batch(dm)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer
    dm.trainer = SimpleNamespace(training=False)  # validating / testing / sanity check
    assert dm.on_after_batch_transfer(batch, 0) is batch
    dm.trainer = SimpleNamespace(training=True)
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.shape == batch[0].shape and x.dtype == batch[0].dtype
    assert torch.equal(y, batch[1])
    assert not torch.equal(x, batch[0])

    dm_off = SyntheticDataModule(batch_size=16, augment=False)
    dm_off.trainer = SimpleNamespace(training=True)
    b = _batch(dm_off)
    assert dm_off.on_after_batch_transfer(b, 0) is b


def test_augment_deterministic_and_correct(tmp_path):
    make_fmnist(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=10, batch_size=32)
    assert dm.pad == 2
    x, y = _batch(dm)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(7)
    a = dm.on_after_batch_transfer((x, y), 0)[0]
    torch.manual_seed(7)
    b = dm.on_after_batch_transfer((x, y), 0)[0]
    assert torch.equal(a, b)
    torch.manual_seed(8)
    assert not torch.equal(a, dm.on_after_batch_transfer((x, y), 0)[0])

    # Every output is one of the image's flip/shift variants, padded with black ((0 - mean) / std).
    fill = torch.tensor([(0 - 0.2860) / 0.3530])
    variants_used = set()
    for i in range(len(x)):
        refs = _reference_flip_crop(x[i], 2, fill)
        hits = [k for k, r in enumerate(refs) if torch.allclose(a[i], r, rtol=0, atol=1e-6)]
        assert hits, f"sample {i} is not a flip/crop of its input"
        variants_used.add(hits[0])
    assert len(variants_used) > 3  # shifts/flips are drawn per sample, not once per batch


def test_random_flip_crop_identity_and_pads():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(random_flip_crop(x, pad=0, flip=False), x)
    assert CIFARDataModule(root="x").pad == 4 and SyntheticDataModule().pad == 2
    assert SyntheticDataModule(pad=3).pad == 3


# --------------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------------


def make_image_folder(root, classes=("cat", "dog"), per_class=5):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)  # 20 wide, 12 high
            img = Image.fromarray(arr)
            if i == 0:
                img = img.convert("L")  # a grayscale file: must still come out with 3 channels
            img.save(root / c / f"{i}.png")


def test_imagefolder(tmp_path, caplog):
    make_image_folder(tmp_path / "train")
    dm = ImageFolderDataModule(root=str(tmp_path / "train"), image_size=16, batch_size=4)
    # Known before setup: the model is built from these.
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.name) == (2, 3, (16, 16), "imagefolder")
    assert dm.classes == ["cat", "dog"] and dm.example_input(2).shape == (2, 3, 16, 16)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9, 1)  # val_size=0.1 of 10
    x, y = dm.train_set[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 16, 16) and set(yb.tolist()) <= {0, 1}
    with caplog.at_level(logging.WARNING, logger="slimnet.data"):
        dm.setup("test")
    assert dm.test_set is dm.val_set and "test_root" in caplog.text


def test_imagefolder_test_root(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test", per_class=2)
    dm = ImageFolderDataModule(
        root=str(tmp_path / "train"), test_root=str(tmp_path / "test"), image_size=(8, 12)
    )
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 4 and dm.test_set[0][0].shape == (3, 8, 12)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataModule(root=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="data.root"):
        ImageFolderDataModule()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataModule(root=str(tmp_path / "empty"))
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "test", classes=("cat", "cow"), per_class=1)
    dm = ImageFolderDataModule(root=str(tmp_path / "train"), test_root=str(tmp_path / "test"))
    with pytest.raises(ValueError, match="data.test_root"):
        dm.setup("test")


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------


def test_synthetic():
    a, b, c = SyntheticDataModule(), SyntheticDataModule(), SyntheticDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup(None)
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (256, 64, 64)
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert torch.equal(a.test_set.labels, b.test_set.labels)
    assert not torch.equal(a.train_set.images, c.train_set.images)
    x, y = a.train_set[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(a.train_set.labels, minlength=4).tolist() == [64] * 4
    assert torch.bincount(a.val_set.labels, minlength=4).tolist() == [16] * 4

    # Learnable: nearest class mean (from train) already classifies the held-out split well.
    means = torch.stack([a.train_set.images[a.train_set.labels == k].mean(0) for k in range(4)])
    dist = torch.cdist(a.val_set.images.flatten(1), means.flatten(1))
    assert (dist.argmin(1) == a.val_set.labels).float().mean() > 0.9


def test_synthetic_shapes_and_setup_stages():
    dm = SyntheticDataModule(
        num_classes=3, in_channels=1, image_size=8, train_size=30, val_size=6, test_size=9
    )
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 1, (8, 8))
    dm.setup("fit")
    assert dm.test_set is None and dm.train_set[0][0].shape == (1, 8, 8)
    dm.setup("test")
    assert len(dm.test_set) == 9


# --------------------------------------------------------------------------------------------------
# Common contract and registry
# --------------------------------------------------------------------------------------------------


def test_loaders_contract(tmp_path):
    dm = SyntheticDataModule(batch_size=16, num_workers=0)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup(None)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(train.sampler, RandomSampler)
    assert isinstance(val.sampler, SequentialSampler) and isinstance(test.sampler, SequentialSampler)
    assert train.batch_size == 16 and not train.drop_last and not train.persistent_workers
    assert train.pin_memory == torch.cuda.is_available()
    dm2 = SyntheticDataModule(num_workers=2)
    dm2.setup("fit")
    assert dm2.train_dataloader().persistent_workers  # built but not iterated: no workers start


def test_val_size_zero_disables_validation():
    dm = SyntheticDataModule(val_size=0)
    dm.setup("fit")
    assert dm.val_dataloader() == []


@pytest.mark.parametrize(
    "dm",
    [
        lambda p: FashionMNISTDataModule(root=str(p)),
        lambda p: CIFARDataModule(root=str(p), num_classes=100),
        lambda p: SyntheticDataModule(in_channels=1, image_size=(12, 10)),
    ],
    ids=["fmnist", "cifar100", "synthetic"],
)
def test_example_input(tmp_path, dm):
    dm = dm(tmp_path)  # nothing on disk: attributes must not need the data
    x = dm.example_input(batch=2)
    assert x.shape == (2, dm.in_channels, *dm.image_size) and x.dtype == torch.float32
    assert isinstance(dm.num_classes, int) and isinstance(dm.name, str) and dm.name


def test_registry():
    assert set(DATAMODULES) == {"fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"}
    with pytest.raises(ValueError) as exc:
        build_datamodule("mnist")
    msg = str(exc.value)
    assert "unknown dataset 'mnist'" in msg and all(name in msg for name in DATAMODULES)
    dm = build_datamodule("cifar10", root="somewhere", batch_size=64)
    assert isinstance(dm, CIFARDataModule) and (dm.num_classes, dm.name, dm.batch_size) == (10, "cifar10", 64)
    assert build_datamodule("cifar100").num_classes == 100
    assert isinstance(build_datamodule("synthetic", num_classes=3), SyntheticDataModule)
    with pytest.raises(ValueError, match="num_classes=100"):
        build_datamodule("cifar10", num_classes=100)
    assert build_datamodule("fashion_mnist").name == "fashion_mnist"
