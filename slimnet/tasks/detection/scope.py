"""What to cut in a torchvision detector: the sub-module for a prune scope, its example input, the
layers outside it that read its channels, and the layers whose outputs are never cut.

``prune.scope`` names a part of the detector:

* ``backbone`` -- the backbone body (``backbone.body``), as the issue's seed pruned it;
* ``backbone+neck`` -- the body and the FPN (``backbone``);
* ``all`` -- the whole detector (the heads too).

``module`` is the part that is sparsity-trained and whose norms rank the channels; ``example_input``
is exactly what that module receives in the detector (the image after the detector's own
normalise/resize/pad). Its outputs are read by layers outside it (``consumers``: the FPN's lateral
convs read the body's stages, the heads read the FPN's levels); cutting an output channel means
cutting the same input channel of those layers. So the cut is not traced on ``module`` alone but on
the detector's trunk (``slimnet.tasks.detection.trunk``: backbone, FPN and the heads' layers, on
``trunk_input``), restricted to the groups whose norms lie ``within`` the scope: channels leaving the
scope are cut on both sides. ``never_cut`` are the layers whose output channels are the detector's
answers (class logits, box deltas, centerness): their input channels may go, their outputs never (in
the trunk they are its outputs, which the channel graph never cuts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

SCOPES = ("backbone", "backbone+neck", "all")

# The answers of each detector: output channels that are classes, box coordinates or centerness.
_NEVER_CUT = {
    GeneralizedRCNN: ["rpn.head.cls_logits", "rpn.head.bbox_pred",
                      "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"],
    RetinaNet: ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    FCOS: ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
           "head.regression_head.bbox_ctrness"],
}
# The heads that read the FPN's levels, each through its first conv or linear layer.
_HEADS = {
    GeneralizedRCNN: ["rpn.head", "roi_heads.box_head"],
    RetinaNet: ["head.classification_head", "head.regression_head"],
    FCOS: ["head.classification_head", "head.regression_head"],
}


@dataclass
class PruneScope:
    """Where a slimming callback cuts a detector; module names are relative to the caller's root
    (``prefix`` of :func:`prune_scope`), e.g. ``model.backbone.body`` inside a ``DetectionTask``."""

    scope: str
    module: str  # the sub-module to trace and cut ("" or the prefix alone for the whole detector)
    example_input: tuple  # positional arguments of that module's forward, batch of one
    consumers: dict[str, list[str]] = field(default_factory=dict)  # output key -> layers outside reading it
    never_cut: list[str] = field(default_factory=list)  # layers whose output channels must stay
    detector: str = ""  # the detector's name under the caller's root (the trunk's plan is kept under it)
    within: str = ""  # the scope relative to the detector ("backbone.body", "backbone", "": all of it)
    trunk_input: tuple = ()  # the trunk's input: the (1, 3, H', W') transformed image


def _kind(detector: nn.Module) -> type:
    for cls in _NEVER_CUT:
        if isinstance(detector, cls):
            return cls
    raise TypeError(f"{type(detector).__name__} is not a torchvision Faster R-CNN, RetinaNet or FCOS detector")


def _first_layer(module: nn.Module, name: str) -> str:
    """Name of the first conv or linear layer inside ``module`` (the one that reads its input)."""
    for sub, m in module.get_submodule(name).named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return f"{name}.{sub}" if sub else name
    raise ValueError(f"{name} has no conv or linear layer")


def _body_consumers(detector: nn.Module) -> dict[str, list[str]]:
    """Body output key -> the FPN layers that read it: the lateral 1x1 conv of its level, and for the
    last stage also P6 when ``LastLevelP6P7`` is built from C5 rather than P5."""
    backbone = detector.backbone
    keys = list(backbone.body.return_layers.values())
    out = {k: [_first_layer(detector, f"backbone.fpn.inner_blocks.{i}")] for i, k in enumerate(keys)}
    extra = backbone.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7) and not extra.use_P5:
        out[keys[-1]].append("backbone.fpn.extra_blocks.p6")
    return out


@torch.no_grad()
def transformed_input(detector: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
    """The (1, 3, H', W') tensor the backbone receives for one zero image of ``image_size``: after the
    detector's own normalisation, resize to ``min_size`` and padding to a multiple of 32."""
    training = detector.transform.training
    detector.transform.eval()  # eval resizes to the last min_size, as at test time
    try:
        images, _ = detector.transform([torch.zeros(3, *image_size)])
    finally:
        detector.transform.train(training)
    return images.tensors


def prune_scope(detector: nn.Module, scope: str, image_size: tuple[int, int], prefix: str = "") -> PruneScope:
    """The sub-module, example input, consumers and never-cut layers of ``scope`` in ``detector``.

    ``prefix`` is the detector's name under the caller's root (``"model"`` in a ``DetectionTask``), so
    every name returned resolves with ``root.get_submodule``.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown prune scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    kind = _kind(detector)

    def name(n: str) -> str:
        return ".".join(p for p in (prefix, n) if p)

    never_cut = [name(n) for n in _NEVER_CUT[kind]]
    x = transformed_input(detector, image_size)
    trunk = {"detector": name(""), "trunk_input": (x,)}
    if scope == "all":
        # The whole detector takes a list of images (its forward, with anchors and NMS, cannot be traced:
        # the cut is traced on the trunk, which runs every layer up to the heads' outputs).
        return PruneScope(scope, name(""), ([torch.zeros(3, *image_size)],), {}, never_cut, within="", **trunk)
    if scope == "backbone":
        consumers = {k: [name(n) for n in v] for k, v in _body_consumers(detector).items()}
        return PruneScope(scope, name("backbone.body"), (x,), consumers, never_cut, within="backbone.body", **trunk)
    with torch.no_grad():
        training = detector.backbone.training
        detector.backbone.eval()
        keys = list(detector.backbone(x))
        detector.backbone.train(training)
    consumers = {k: [name(_first_layer(detector, h)) for h in _HEADS[kind]] for k in keys}
    if kind is GeneralizedRCNN:  # the RoI head pools only some levels (not the max-pooled "pool")
        pooled = set(detector.roi_heads.box_roi_pool.featmap_names)
        box_head = name(_first_layer(detector, "roi_heads.box_head"))
        consumers = {k: [n for n in v if n != box_head or k in pooled] for k, v in consumers.items()}
    return PruneScope(scope, name("backbone"), (x,), consumers, never_cut, within="backbone", **trunk)
