"""COCO-format detection data: a folder of images and an ``instances`` JSON per split.

The JSON is read with the standard library (no pycocotools): ``images`` (``id``, ``file_name``,
``width``, ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]``,
``iscrowd``) and ``categories`` (``id``, ``name``). Category ids, which COCO numbers with gaps, map to
labels 1..K in id order (0 is the background for torchvision detectors).

Everything a wrong file would break is checked before any training -- the training split when the
module is built, the others in ``check()`` -- each with one line naming the file and the fix:

* an empty or unreadable annotation file, or one with no images or no annotations;
* a JSON that does not match the images folder (listed files missing, or a size that differs from
  the file's, checked on the first few images);
* a box outside its image (more than ``box_tolerance`` pixels past a border; boxes within it are
  clipped, since COCO's own files have boxes a fraction of a pixel past the border).

Boxes of zero width or height are dropped, as torchvision's reference scripts do (the detectors'
losses refuse them). Crowd annotations (``iscrowd=1``) are left out of training; in validation and
test they travel with the targets as ``iscrowd``, which ``MeanAveragePrecision`` treats as COCO does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from slimnet.tasks.detection.data import DetectionDataModule

log = logging.getLogger(__name__)

SIZE_CHECKS = 8  # images whose real size is compared with the JSON's in check(): catches a wrong folder


@dataclass
class CocoSplit:
    """One parsed split: per image its file, size and targets, with labels already 1..K."""

    images_dir: Path
    ann_file: Path
    categories: dict[int, str]  # id -> name; label i is the i-th id
    files: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) as the JSON says
    boxes: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    crowd: list[torch.Tensor] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)


def _read_json(ann_file: Path, key: str) -> dict:
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} not found: set {key} to a COCO instances JSON")
    text = ann_file.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"annotation file {ann_file} is empty: set {key} to a COCO instances JSON")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {ann_file} is not valid JSON ({err}): set {key} to a COCO "
                         "instances JSON") from None
    if not isinstance(data, dict) or not data.get("images") or not data.get("annotations"):
        what = "images" if not isinstance(data, dict) or not data.get("images") else "annotations"
        raise ValueError(f"annotation file {ann_file} has no {what}: a COCO instances JSON needs 'images', "
                         f"'annotations' and 'categories'; set {key} to one")
    return data


def _categories(data: dict, ann_file: Path, key: str) -> dict[int, str]:
    """``{category id: name}`` in id order."""
    cats = data.get("categories") or []
    if not cats:
        raise ValueError(f"annotation file {ann_file} has no categories: set {key} to a COCO instances JSON")
    return {int(c["id"]): str(c.get("name", c["id"])) for c in sorted(cats, key=lambda c: int(c["id"]))}


def read_coco(images_dir: str | os.PathLike, ann_file: str | os.PathLike, categories: dict[int, str] | None = None,
              box_tolerance: float = 1.0, keep_crowd: bool = True, key: str = "data") -> CocoSplit:
    """Parse and check one split. ``categories`` (``{id: name}``, e.g. the training split's) fixes how
    category ids map to labels 1..K, so that every split numbers classes alike; None: this file's own.
    ``key`` names the config entries in messages (``data.train`` -> ``data.train_images``)."""
    images_dir, ann_file = Path(images_dir), Path(ann_file)
    data = _read_json(ann_file, f"{key}_annotations")
    if categories is None:
        categories = _categories(data, ann_file, f"{key}_annotations")
    label_of = {cid: i + 1 for i, cid in enumerate(categories)}
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} not found: set {key}_images to the folder of "
                                f"the images {ann_file.name} lists")

    split = CocoSplit(images_dir, ann_file, dict(categories))
    index: dict[int, int] = {}
    present = set(os.listdir(images_dir))
    missing = []
    for img in data["images"]:
        name = str(img["file_name"])
        # file_name may hold a sub-folder ("train2017/0001.jpg"); only then look beyond the listing
        if name not in present and not (images_dir / name).is_file():
            missing.append(name)
        index[int(img["id"])] = len(split.files)
        split.files.append(name)
        split.sizes.append((int(img["height"]), int(img["width"])))
        split.image_ids.append(int(img["id"]))
    if missing:
        raise ValueError(
            f"{ann_file} does not match {images_dir}: {len(missing)} of {len(split.files)} listed images are "
            f"missing (first: {missing[0]}); point {key}_images at the folder this JSON was made for"
        )

    per_image: list[list[tuple[list[float], int, int]]] = [[] for _ in split.files]
    dropped = 0
    for ann in data["annotations"]:
        i = index.get(int(ann["image_id"]))
        if i is None:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                             "which 'images' does not list; fix or remove that annotation")
        cat = int(ann["category_id"])
        if cat not in label_of:
            raise ValueError(f"{ann_file}: annotation {ann.get('id')} has category_id {cat}, unknown to the "
                             f"training categories {sorted(label_of)}; use one category list for all splits")
        x, y, w, h = (float(v) for v in ann["bbox"])
        height, width = split.sizes[i]
        t = box_tolerance
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise ValueError(
                f"{ann_file}: annotation {ann.get('id')} has box [x, y, w, h] = {ann['bbox']} outside its "
                f"image {split.files[i]} ({width}x{height}); fix the box or drop the annotation (boxes at "
                f"most box_tolerance={t} px past the border are clipped)"
            )
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            dropped += 1
            continue
        crowd = int(ann.get("iscrowd", 0))
        if crowd and not keep_crowd:
            continue
        per_image[i].append(([x1, y1, x2, y2], label_of[cat], crowd))
    if dropped:
        log.warning("%s: dropped %d boxes of zero width or height", ann_file, dropped)

    for anns in per_image:
        split.boxes.append(torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4))
        split.labels.append(torch.tensor([a[1] for a in anns], dtype=torch.int64))
        split.crowd.append(torch.tensor([a[2] for a in anns], dtype=torch.int64))
    if not any(len(b) for b in split.boxes):
        raise ValueError(f"{ann_file} has no usable boxes (all empty or crowd): set {key}_annotations to a "
                         "COCO instances JSON with objects")
    _check_sizes(split, key)
    return split


def _check_sizes(split: CocoSplit, key: str) -> None:
    """Compare the real size of the first images with the JSON's (header only, no decoding)."""
    from PIL import Image

    for name, (h, w) in list(zip(split.files, split.sizes))[:SIZE_CHECKS]:
        with Image.open(split.images_dir / name) as im:
            real_w, real_h = im.size
        if (real_h, real_w) != (h, w):
            raise ValueError(
                f"{split.ann_file} does not match {split.images_dir}: {name} is {real_w}x{real_h} but the JSON "
                f"says {w}x{h}; point {key}_images at the folder this JSON was made for"
            )


class CocoDetectionDataset(Dataset):
    """Decodes one image per item (RGB, with PIL: torchvision.io's decoders are deprecated since 0.29)
    and hands its parsed targets."""

    def __init__(self, split: CocoSplit, with_crowd: bool):
        self.split, self.with_crowd = split, with_crowd

    def __len__(self) -> int:
        return len(self.split.files)

    def __getitem__(self, i: int):
        import numpy as np
        from PIL import Image

        s = self.split
        with Image.open(s.images_dir / s.files[i]) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8
        if tuple(image.shape[-2:]) != s.sizes[i]:
            raise ValueError(f"{s.images_dir / s.files[i]} is {image.shape[-1]}x{image.shape[-2]} but "
                             f"{s.ann_file} says {s.sizes[i][1]}x{s.sizes[i][0]}; regenerate the JSON")
        target = {"boxes": s.boxes[i], "labels": s.labels[i], "image_id": torch.tensor(s.image_ids[i])}
        if self.with_crowd:
            target["iscrowd"] = s.crowd[i]
        return image.float() / 255.0, target


class COCODetectionDataModule(DetectionDataModule):
    """Images folders and instances JSONs in COCO format, for real use.

    Args:
        train_images, train_annotations: the training folder and its JSON (categories come from here).
        val_images, val_annotations: the validation split.
        test_images, test_annotations: the test split; the validation split when not given.
        image_size: the nominal (H, W) for example inputs and FLOPs (the detector resizes every image
            to its own ``min_size``/``max_size`` anyway).
        box_tolerance: how many pixels past the border a box may reach before it is an error (such
            boxes are clipped to the image).
    """

    name = "coco"

    def __init__(self, train_images: str, train_annotations: str, val_images: str, val_annotations: str,
                 test_images: str | None = None, test_annotations: str | None = None,
                 image_size: int | tuple[int, int] = 512, box_tolerance: float = 1.0,
                 batch_size: int = 4, num_workers: int = 2, augment: bool = True):
        super().__init__(batch_size, num_workers, augment)
        if (test_images is None) != (test_annotations is None):
            raise ValueError("set both data.test_images and data.test_annotations, or neither")
        self.paths = {"train": (train_images, train_annotations), "val": (val_images, val_annotations),
                      "test": (test_images, test_annotations) if test_images else (val_images, val_annotations)}
        self.box_tolerance = float(box_tolerance)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        # The detector needs K before setup, and K comes from the training JSON: parse (and check) that
        # split now, once; a COCO train JSON takes seconds to read.
        self._parsed: dict[str, CocoSplit] = {}
        train = self._parse("train")
        self.category_ids = tuple(train.categories)
        self.classes = tuple(train.categories.values())

    def _parse(self, split: str) -> CocoSplit:
        if split == "test" and self.paths["test"] == self.paths["val"]:
            split = "val"  # no test files given: the validation split, parsed once
        if split not in self._parsed:
            images, ann = (os.path.expanduser(p) for p in self.paths[split])
            categories = None if split == "train" else self._parsed["train"].categories
            self._parsed[split] = read_coco(images, ann, categories, self.box_tolerance,
                                            keep_crowd=split != "train", key=f"data.{split}")
        return self._parsed[split]

    def check(self) -> None:
        """Parse and check every split now: a wrong file fails here, not after an epoch."""
        for split in ("train", "val", "test"):
            self._parse(split)

    def prepare_data(self) -> None:
        self.check()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = CocoDetectionDataset(self._parse("train"), with_crowd=False)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = CocoDetectionDataset(self._parse("val"), with_crowd=True)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = CocoDetectionDataset(self._parse("test"), with_crowd=True)
