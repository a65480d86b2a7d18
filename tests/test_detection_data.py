"""Detection data: the synthetic set (deterministic, valid targets) and COCO-format folders, with the
one-line errors for files that do not fit. COCO folders are written to tmp_path; nothing is fetched."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from slimnet.tasks.detection.coco import COCODetectionDataModule
from slimnet.tasks.detection.data import SyntheticDetectionDataModule, hflip
from slimnet.tasks.detection.synthetic import SHAPES, SceneConfig, generate, image_generator, render_scene

# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------


def test_synthetic_scene_is_a_function_of_seed_split_and_index_only():
    cfg = SceneConfig(image_size=96)
    a_img, a_boxes, a_labels = generate(cfg, 6, seed=3, split="val")
    b_img, b_boxes, b_labels = generate(cfg, 3, seed=3, split="val")  # fewer images: the same first three
    assert torch.equal(a_img[:3], b_img)
    assert all(torch.equal(x, y) for x, y in zip(a_boxes[:3], b_boxes))
    assert all(torch.equal(x, y) for x, y in zip(a_labels[:3], b_labels))
    # another seed or split gives other images; so does the next index
    assert not torch.equal(generate(cfg, 1, seed=4, split="val")[0][0], a_img[0])
    assert not torch.equal(generate(cfg, 1, seed=3, split="train")[0][0], a_img[0])
    assert not torch.equal(a_img[0], a_img[1])


def test_synthetic_targets_are_valid_and_varied():
    cfg = SceneConfig(image_size=128)
    images, boxes, labels = generate(cfg, 60, seed=0, split="train")
    assert images.shape == (60, 3, 128, 128) and images.dtype == torch.uint8
    all_boxes, all_labels = torch.cat(boxes), torch.cat(labels)
    assert all_boxes.dtype == torch.float32 and all_labels.dtype == torch.int64
    # boxes inside the image, positive width and height; labels 1..K (0 is torchvision's background)
    assert (all_boxes >= 0).all() and (all_boxes <= 128).all()
    assert (all_boxes[:, 2:] > all_boxes[:, :2]).all()
    assert set(all_labels.tolist()) == set(range(1, len(SHAPES) + 1))
    # several objects per image on average, sizes spread over a wide range, various aspects
    assert all(len(b) >= 1 for b in boxes) and len(all_boxes) / 60 > 2
    wh = all_boxes[:, 2:] - all_boxes[:, :2]
    assert wh.min() < 20 and wh.max() > 50
    aspect = wh[:, 0] / wh[:, 1]
    assert aspect.min() < 0.7 and aspect.max() > 1.4
    # some objects overlap (IoU > 0 between two boxes of one image)
    from torchvision.ops import box_iou

    overlaps = sum(int((box_iou(b, b).triu(1) > 0).any()) for b in boxes)
    assert overlaps >= 5


def test_synthetic_box_is_tight_around_the_painted_object():
    """A lone object on a flat background: its box is exactly the extent of the changed pixels."""
    cfg = SceneConfig(image_size=64, max_objects=1, max_clutter=0)
    img, boxes, _ = render_scene(cfg, image_generator(0, "train", 5))
    assert len(boxes) == 1
    x1, y1, x2, y2 = boxes[0].int().tolist()
    img = img.float()
    inside = img[:, y1:y2, x1:x2]
    # every row and column of the box holds object pixels: mean colour of its border rows differs from
    # the row just outside the box (the background), which a loose box would not show
    assert (inside[:, 0, :] - img[:, y1 - 1, x1:x2]).abs().amax() > 40 or y1 == 0
    assert (inside[:, :, 0] - img[:, y1:y2, x1 - 1]).abs().amax() > 40 or x1 == 0


def test_synthetic_datamodule_batches_in_torchvision_format():
    dm = SyntheticDetectionDataModule(image_size=64, train_size=10, val_size=4, test_size=4, batch_size=4,
                                      num_classes=3)
    assert dm.num_classes == 3 and dm.classes == SHAPES[:3]
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 4 and images[0].shape == (3, 64, 64)
    assert 0.0 <= float(images[0].min()) and float(images[0].max()) <= 1.0
    assert set(targets[0]) >= {"boxes", "labels"}
    assert all(int(t["labels"].max()) <= 3 for t in targets)
    assert dm.test_set is None  # the test split is generated for stage "test" only
    assert [x.shape for x in dm.example_input(2)] == [(3, 64, 64)] * 2


def test_flip_augmentation_moves_boxes_with_the_pixels():
    dm = SyntheticDetectionDataModule(image_size=64, train_size=8, val_size=2, test_size=0, batch_size=8)
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    out_images, out_targets = dm.on_after_batch_transfer((images, targets), 0)
    for x, t, y, u in zip(images, targets, out_images, out_targets):
        flipped = not torch.equal(x, y)
        if flipped:
            ref_x, ref_t = hflip(x, t)
            assert torch.equal(y, ref_x) and torch.equal(u["boxes"], ref_t["boxes"])
        # the box still frames the same pixels: the crop under it is the mirrored original crop
        x1, y1, x2, y2 = t["boxes"][0].int().tolist()
        a1, _, a2, _ = u["boxes"][0].int().tolist()
        crop = y[:, y1:y2, a1:a2]
        assert torch.equal(crop, x[:, y1:y2, x1:x2].flip(-1) if flipped else x[:, y1:y2, x1:x2])


# --------------------------------------------------------------------------------------------------
# COCO format
# --------------------------------------------------------------------------------------------------


def write_coco(folder, n_images: int = 3, size=(40, 60), boxes=None, categories=((3, "cat"), (7, "dog"))):
    """A tiny COCO split: PNGs of ``size`` (H, W) and an instances JSON with one box per image."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    h, w = size
    images, anns = [], []
    for i in range(n_images):
        name = f"{i:04d}.png"
        Image.new("RGB", (w, h), (10 * i,) * 3).save(images_dir / name)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        box = boxes[i] if boxes else [5.0, 6.0, 10.0 + i, 12.0]
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": categories[i % len(categories)][0],
                     "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": n} for c, n in categories]}))
    return str(images_dir), str(ann_file)


def _dm(train, val, **kw):
    return COCODetectionDataModule(train[0], train[1], val[0], val[1], batch_size=2, num_workers=0, **kw)


def test_coco_loads_boxes_as_xyxy_with_labels_one_to_k(tmp_path):
    train = write_coco(tmp_path / "train")
    val = write_coco(tmp_path / "val", n_images=2)
    dm = _dm(train, val)
    assert dm.classes == ("cat", "dog") and dm.num_classes == 2
    dm.check()
    dm.setup("fit")
    image, target = dm.train_set[1]
    assert image.shape == (3, 40, 60) and abs(float(image.mean()) - 10 / 255) < 1e-6
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 6.0, 16.0, 18.0]]))  # x, y, w, h -> xyxy
    assert target["labels"].tolist() == [2]  # category 7 ("dog") is the second category: label 2
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == 2 and "iscrowd" in targets[0]  # evaluation keeps crowd flags for the metric
    assert dm.test_set is None and len(dm.val_set) == 2


def test_coco_clips_boxes_a_fraction_of_a_pixel_past_the_border(tmp_path):
    train = write_coco(tmp_path / "train", boxes=[[50.0, 30.0, 10.4, 10.3]] * 3)  # ends at 60.4 x 40.3
    dm = _dm(train, train)
    dm.setup("fit")
    torch.testing.assert_close(dm.train_set[0][1]["boxes"], torch.tensor([[50.0, 30.0, 60.0, 40.0]]))


def _one_line_error(dm_factory, match: str):
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        dm_factory()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_coco_json_that_does_not_match_the_images_fails_before_training(tmp_path):
    train = write_coco(tmp_path / "train")
    (tmp_path / "train" / "images" / "0001.png").unlink()
    msg = _one_line_error(lambda: _dm(train, train).check(), "does not match")
    assert "0001.png" in msg and "data.train_images" in msg

    # all files present, but the folder holds other images (another size than the JSON says)
    other = write_coco(tmp_path / "other", size=(32, 32))
    good, val = write_coco(tmp_path / "good"), write_coco(tmp_path / "val")
    msg = _one_line_error(lambda: _dm(good, (other[0], val[1])).check(),
                          "does not match")
    assert "32x32" in msg and "data.val_images" in msg


def test_coco_box_outside_the_image_fails_before_training(tmp_path):
    train = write_coco(tmp_path / "train", boxes=[[5, 5, 10, 10], [55.0, 5.0, 20.0, 10.0], [5, 5, 10, 10]])
    msg = _one_line_error(lambda: _dm(train, train).check(), "outside its image")
    assert "annotation 2" in msg and "0001.png" in msg and "60x40" in msg


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "has no images"),
    ("{not json", "not valid JSON"),
])
def test_coco_empty_annotation_file_fails_at_build(tmp_path, content, match):
    images_dir, _ = write_coco(tmp_path / "train")
    ann = tmp_path / "empty.json"
    ann.write_text(content)
    msg = _one_line_error(lambda: _dm((images_dir, str(ann)), (images_dir, str(ann))), match)
    assert "data.train_annotations" in msg


def test_coco_split_without_annotations_fails_before_training(tmp_path):
    train = write_coco(tmp_path / "train")
    val_images, val_ann = write_coco(tmp_path / "val")
    with open(val_ann) as f:
        data = json.load(f)
    data["annotations"] = []
    with open(val_ann, "w") as f:
        json.dump(data, f)
    msg = _one_line_error(lambda: _dm(train, (val_images, val_ann)).check(), "has no annotations")
    assert "data.val_annotations" in msg
