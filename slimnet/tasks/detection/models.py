"""Build torchvision detectors (Faster R-CNN, RetinaNet, FCOS) on any ResNet- or MobileNet-family
backbone, with random weights or a backbone state_dict from a local file; never downloads.

Why not the ``*_resnet50_fpn`` builders: they fix the backbone, and with ``weights_backbone=None``
they silently switch FrozenBatchNorm2d to BatchNorm2d. Here the backbone and the norm are choices,
and the rest follows torchvision's own builders: Faster R-CNN reads P2-P6 (``returned_layers`` 1-4
plus a max-pooled level), RetinaNet and FCOS read P3-P7 (layers 2-4 plus ``LastLevelP6P7``).

Anchors are sized from each level's stride, measured on a dummy input, so any backbone fits:
``anchor_scale x stride``, with torchvision's own defaults (8 for Faster R-CNN: 32..512 px on strides
4..64; 4 for RetinaNet; 1 for FCOS, whose "anchors" are its strides). Images of ~128 px with objects
of 10-70 px want smaller ones (``anchor_scale=4`` for Faster R-CNN).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.sparsity.norms import EvalModeBatchNorm2d

# resnet_fpn_backbone and mobilenet_backbone accept exactly these names
RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
MOBILENET_BACKBONES = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
# "batchnorm_eval": trainable γ and β on fixed running statistics (mmdetection's norm_eval), for a
# backbone loaded from backbone_weights; with random weights its statistics would stay at 0 and 1.
NORMS: dict[str, type[nn.Module]] = {"batchnorm": nn.BatchNorm2d, "batchnorm_eval": EvalModeBatchNorm2d,
                                     "frozen": FrozenBatchNorm2d}


def _fpn_backbone(name: str, norm: str, trainable_layers: int, two_stage: bool, fpn_channels: int) -> nn.Module:
    """A ``BackboneWithFPN``: P2-P6 for a two-stage detector, P3-P7 for a one-stage one."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    norm_layer = NORMS[norm]
    c = int(fpn_channels)
    extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(c, c)
    if name in RESNET_BACKBONES:
        returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
        bb = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=norm_layer,
                                 trainable_layers=trainable_layers, returned_layers=returned, extra_blocks=extra)
    elif name in MOBILENET_BACKBONES:
        bb = mobilenet_backbone(backbone_name=name, weights=None, fpn=True, norm_layer=norm_layer,
                                trainable_layers=min(trainable_layers, 6), extra_blocks=extra)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of: "
                         f"{', '.join(RESNET_BACKBONES + MOBILENET_BACKBONES)}")
    if c != bb.out_channels:  # torchvision's extractors fix 256; a narrower FPN makes neck and heads cheap
        in_channels = [block[0].in_channels for block in bb.fpn.inner_blocks]
        bb.fpn = FeaturePyramidNetwork(in_channels, c, extra_blocks=extra)
        bb.out_channels = c
    return bb


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision *classification* checkpoint (e.g. ``resnet50-0676ba61.pth``) into the FPN
    backbone's body: the classifier is dropped and MobileNet's ``features.`` prefix removed."""
    state = torch.load(os.path.expanduser(str(path)), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    head = ("fc.", "classifier.")
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith(head)}
    hint = "set model.backbone_weights to a checkpoint of the torchvision model named in model.backbone"
    try:
        missing, unexpected = backbone.body.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ (another depth or width)
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{path} does not fit this backbone ({first}): {hint}") from None
    # num_batches_tracked is absent from FrozenBN and optional for BN: neither a sign of a wrong file
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this backbone ({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): {hint}"
        )


@torch.no_grad()
def feature_strides(backbone: nn.Module, probe: int = 128) -> list[int]:
    """The stride of each feature map the backbone returns, measured on a (1, 3, probe, probe) input."""
    training = backbone.training
    backbone.eval()
    try:
        feats = backbone(torch.zeros(1, 3, probe, probe))
    finally:
        backbone.train(training)
    return [max(1, round(probe / f.shape[-1])) for f in feats.values()]


def _faster_rcnn(backbone, num_classes, strides, scale, **kw):
    sizes = tuple((int(scale * s),) for s in strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **kw)


def _retinanet(backbone, num_classes, strides, scale, **kw):
    # three scales an octave apart per level, as torchvision's retinanet_resnet50_fpn
    sizes = tuple(tuple(int(scale * s * 2 ** (i / 3)) for i in range(3)) for s in strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, **kw)


def _fcos(backbone, num_classes, strides, scale, **kw):
    # FCOS's "anchors" are points: one square per location whose side sets the level's size range
    anchors = AnchorGenerator(tuple((int(scale * s),) for s in strides), ((1.0,),) * len(strides))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **kw)


# kind -> (builder, torchvision class, two-stage?, torchvision's anchor_scale)
DETECTORS: dict[str, tuple[Callable[..., nn.Module], type, bool, float]] = {
    "fasterrcnn": (_faster_rcnn, FasterRCNN, True, 8.0),
    "retinanet": (_retinanet, RetinaNet, False, 4.0),
    "fcos": (_fcos, FCOS, False, 1.0),
}


def _check_kwargs(kind: str, cls: type, kwargs: dict) -> None:
    """torchvision hands unknown keywords to its transform, which ignores them: a typo, or Faster
    R-CNN's ``rpn_*`` given to FCOS, would silently do nothing. Refuse them instead."""
    known = set(inspect.signature(cls).parameters) - {"backbone", "num_classes", "kwargs"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"model.detector_kwargs {unknown} are not arguments of {cls.__name__} ({kind}); "
                         f"it takes: {', '.join(sorted(known))}")


def build_detector(kind: str = "fasterrcnn", backbone: str = "resnet18", num_classes: int = 5,
                   min_size: int = 128, max_size: int = 128, norm: str = "batchnorm", trainable_layers: int = 5,
                   fpn_channels: int = 256, anchor_scale: float | None = None, score_thresh: float | None = None,
                   backbone_weights: str | None = None, detector_kwargs: dict | None = None,
                   **more_kwargs) -> nn.Module:
    """A torchvision detector with random weights (or the backbone from ``backbone_weights``).

    Args:
        kind: ``fasterrcnn``, ``retinanet`` or ``fcos``.
        backbone: a ResNet/ResNeXt/Wide-ResNet or MobileNet v2/v3 name of torchvision.
        num_classes: foreground classes K; the detector gets K + 1 outputs (0 is the background).
        min_size, max_size: the detector's internal resize (torchvision's defaults 800/1333 are for
            COCO; 128 keeps CPU training of small images feasible).
        norm: ``batchnorm`` (trainable), ``batchnorm_eval`` (trainable γ and β on fixed running
            statistics, for pretrained ``backbone_weights``) or ``frozen`` (``FrozenBatchNorm2d``, as
            torchvision's pretrained detectors: nothing to slim until ``slimnet.sparsity.norms.unfreeze_batchnorm``).
        trainable_layers: backbone stages whose parameters train (5 = all), as in torchvision.
        fpn_channels: width of the FPN and so of the heads' input (torchvision: 256). The heads run on
            every level at this width; 64 makes a detector for 128 px images ~4x cheaper.
        anchor_scale: anchor side = scale x level stride; None for torchvision's default of the kind.
        score_thresh: lowest score of a detection kept at inference (Faster R-CNN's ``box_score_thresh``);
            None for torchvision's (0.05; FCOS 0.2, which hides an early model's boxes from mAP).
        backbone_weights: a local torchvision classification checkpoint for the backbone body.
        detector_kwargs, more_kwargs: passed to the torchvision class (``box_detections_per_img``,
            ``rpn_post_nms_top_n_test``, …); a dict (as a config holds them) or keywords, or both.
    """
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector kind {kind!r}; choose one of: {', '.join(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes counts foreground classes and must be >= 1, got {num_classes}")
    if kind == "fcos" and (fpn_channels % 32 or fpn_channels < 64):
        # FCOSHead normalises with GroupNorm(32, C): C = 32 leaves one value per group on the 1x1 top level
        raise ValueError(f"fcos needs fpn_channels a multiple of 32 and >= 64 (its heads use GroupNorm(32)), "
                         f"got {fpn_channels}")
    detector_kwargs = {**(detector_kwargs or {}), **more_kwargs}
    builder, cls, two_stage, default_scale = DETECTORS[kind]
    _check_kwargs(kind, cls, detector_kwargs)
    body = _fpn_backbone(backbone, norm, trainable_layers, two_stage, fpn_channels)
    if backbone_weights:
        load_backbone_weights(body, backbone_weights)
    strides = feature_strides(body)
    scale = default_scale if anchor_scale is None else float(anchor_scale)
    if score_thresh is not None:
        detector_kwargs["box_score_thresh" if two_stage else "score_thresh"] = float(score_thresh)
    return builder(body, num_classes + 1, strides, scale, min_size=min_size, max_size=max_size, **detector_kwargs)
