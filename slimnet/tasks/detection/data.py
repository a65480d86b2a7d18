"""Detection DataModules: batches shaped the way torchvision detectors take them.

A batch is ``(images, targets)``: a list of float images (3, H, W) in [0, 1] (the detector normalises
and resizes them itself, in its ``GeneralizedRCNNTransform``) and a list of dicts with ``boxes``
(float32 (k, 4), xyxy in pixels), ``labels`` (int64 (k,), 1..K: torchvision keeps 0 for the
background) and ``image_id``. Images may differ in size, hence lists rather than one tensor.

Training augmentation is a random horizontal flip (boxes flipped with it), per image, on the device,
in ``on_after_batch_transfer`` as the classification DataModules do; it uses the global generator,
which Lightning's ``seed_everything`` seeds.

``SyntheticDetectionDataModule`` is the offline default (see ``synthetic.py``); the COCO-format
module for real data is in ``coco.py``.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from slimnet.tasks.detection.synthetic import SHAPES, SceneConfig, generate


def collate_detection(batch):
    """``[(image, target), ...]`` -> ``([images], [targets])``: no stacking, sizes may differ."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Mirror an image (3, H, W) and its xyxy boxes left to right."""
    w = image.shape[-1]
    boxes = target["boxes"]
    flipped = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.flip(-1), {**target, "boxes": flipped}


def _is_batch(batch) -> bool:
    """An (images, targets) batch, as opposed to e.g. the model's ``example_input_array``, which
    Lightning's ModelSummary also sends through ``on_after_batch_transfer``."""
    return (isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[1], (list, tuple))
            and all(isinstance(t, dict) for t in batch[1]))


class InMemoryDetectionDataset(Dataset):
    """uint8 images (N, 3, H, W) held in memory, with one target dict per image."""

    def __init__(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]):
        if not (len(images) == len(boxes) == len(labels)):
            raise ValueError(f"got {len(images)} images, {len(boxes)} box sets and {len(labels)} label sets")
        self.images, self.boxes, self.labels = images, boxes, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        target = {"boxes": self.boxes[i], "labels": self.labels[i], "image_id": torch.tensor(i)}
        return self.images[i].float() / 255.0, target


class DetectionDataModule(pl.LightningDataModule):
    """Loaders and the flip augmentation shared by the detection DataModules.

    Subclasses set ``name``, ``classes`` (foreground names, label ``i`` is ``classes[i - 1]``) and
    ``image_size`` (the nominal (H, W) that example inputs and FLOPs use) in ``__init__`` and fill
    ``train_set`` / ``val_set`` / ``test_set`` in ``setup``.
    """

    name: str = ""
    classes: tuple[str, ...]
    image_size: tuple[int, int]

    def __init__(self, batch_size: int = 8, num_workers: int = 0, augment: bool = True):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.batch_size, self.num_workers, self.augment = int(batch_size), int(num_workers), bool(augment)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Foreground classes K; a torchvision detector is built with ``K + 1`` (the background)."""
        return len(self.classes)

    def example_input(self, batch: int = 1) -> list[torch.Tensor]:
        """What a detector's forward takes: a list of ``batch`` zero images of the nominal size."""
        return [torch.zeros(3, *self.image_size) for _ in range(batch)]

    def check(self) -> None:
        """Verify the data before training starts (nothing to verify for generated data)."""

    def _loader(self, dataset: Dataset | None, shuffle: bool, stage: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup('{stage}') before asking for its dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_detection,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, stage="fit")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, stage="validate")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, stage="test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not (self.augment and self.trainer is not None and self.trainer.training and _is_batch(batch)):
            return batch
        images, targets = batch
        flips = (torch.rand(len(images)) < 0.5).tolist()
        pairs = [hflip(x, t) if f else (x, t) for x, t, f in zip(images, targets, flips)]
        return [p[0] for p in pairs], [p[1] for p in pairs]


class SyntheticDetectionDataModule(DetectionDataModule):
    """Generated shapes on textured backgrounds (``synthetic.py``): the offline default, no files.

    Every split is generated whole in ``setup`` (about 6 ms an image at 128 px on one core) and held
    in memory as uint8. Image ``i`` of a split depends only on ``(seed, split, i)``.
    """

    name = "synthetic_detection"

    def __init__(
        self,
        image_size: int = 128,
        num_classes: int = len(SHAPES),
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        max_objects: int = 5,
        min_object_size: float = 14.0,
        max_object_size: float = 56.0,
        max_clutter: int = 6,
        min_visible: float = 0.5,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        augment: bool = True,
    ):
        super().__init__(batch_size, num_workers, augment)
        if train_size < 1 or val_size < 1 or test_size < 0:
            raise ValueError(f"need train_size >= 1, val_size >= 1, test_size >= 0; got {train_size}, {val_size}, "
                             f"{test_size}")
        self.scene = SceneConfig(int(image_size), int(num_classes), int(max_objects), float(min_object_size),
                                 float(max_object_size), int(max_clutter), float(min_visible))
        self.sizes = {"train": int(train_size), "val": int(val_size), "test": int(test_size)}
        self.seed = int(seed)
        self.classes = SHAPES[: self.scene.num_classes]
        self.image_size = (self.scene.image_size, self.scene.image_size)

    def _split(self, split: str) -> InMemoryDetectionDataset:
        return InMemoryDetectionDataset(*generate(self.scene, self.sizes[split], self.seed, split))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            if self.train_set is None and stage != "validate":
                self.train_set = self._split("train")
            if self.val_set is None:
                self.val_set = self._split("val")
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._split("test")
