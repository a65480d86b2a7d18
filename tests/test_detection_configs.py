"""The detection configs build what they describe: every key is an argument the object accepts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_detection_data import write_coco
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.tasks.detection.coco import COCODetectionDataModule
from slimnet.tasks.detection.data import SyntheticDetectionDataModule
from slimnet.tasks.detection.models import build_detector

CONF = Path(__file__).resolve().parents[1] / "conf"


def _load(group: str, name: str, **overrides):
    cfg = OmegaConf.create({"seed": 7, "node": OmegaConf.load(CONF / group / f"{name}.yaml")})
    return OmegaConf.merge(cfg, {"node": overrides}).node


def test_synthetic_detection_config_builds_its_datamodule():
    dm = instantiate(_load("data", "synthetic_detection"))
    assert isinstance(dm, SyntheticDetectionDataModule)
    assert dm.seed == 7 and dm.num_classes == 5 and dm.image_size == (128, 128)


def test_coco_config_needs_its_paths_and_builds_with_them(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="train_images"):
        instantiate(_load("data", "coco"))
    images, ann = write_coco(tmp_path / "train")
    dm = instantiate(_load("data", "coco", train_images=images, train_annotations=ann, val_images=images,
                           val_annotations=ann))
    assert isinstance(dm, COCODetectionDataModule) and dm.classes == ("cat", "dog")


def test_detector_config_keys_are_build_detector_arguments():
    cfg = _load("model", "detector", norm="frozen")
    assert cfg._target_ == f"{build_detector.__module__}.{build_detector.__name__}"
    detector = instantiate(cfg, num_classes=3)  # Hydra's own way, as the run's build_model({**cfg, num_classes: K})
    assert type(detector).__name__ == "FCOS" and detector.score_thresh == 0.05
    assert isinstance(detector.backbone.body.bn1, FrozenBatchNorm2d) and detector.backbone.out_channels == 64


def test_faster_rcnn_preset_builds_a_small_image_faster_rcnn():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="model/detector_fasterrcnn").model
    GlobalHydra.instance().clear()
    detector = instantiate(cfg, num_classes=3)
    assert type(detector).__name__ == "FasterRCNN"
    assert detector.rpn.post_nms_top_n() == 300  # training mode: the preset's budget, not torchvision's 2000
    assert detector.roi_heads.score_thresh == 0.05
    assert detector.rpn.anchor_generator.sizes[0] == (16,)  # 4 x stride 4
