"""A torchvision detector's convolutional trunk as one traceable module, and a slimming callback that
cuts the detector through it.

The detector's own forward cannot be traced (image lists, anchors, NMS: data-dependent control flow),
yet a cut that crosses the backbone's boundary needs one graph from the image tensor to the heads'
class and box outputs: the body's stage outputs feed the FPN's lateral convs, the FPN's levels feed
the heads. ``DetectorTrunk`` runs exactly those layers, and holds the detector's own sub-modules under
the detector's own names (``backbone.body.layer1.0.conv1``, ``head.classification_head.conv.0.0``,
``rpn.head.conv.0.0``, ``roi_heads.box_head.fc6`` …), so a plan made on the trunk *is* a plan of the
detector: it replays on a freshly built detector and travels in the callback's checkpoint state.

    trunk = DetectorTrunk(detector)
    slimnet.prune(trunk, x, percent=0.3, within="backbone.body")  # x: the transformed (1, 3, H, W) image
    # (a detector on FrozenBatchNorm2d: its γ were never sparsity-trained; cut_frozen=True ranks them anyway)

What the trunk runs, per kind:

* RetinaNet, FCOS: ``backbone`` → on every level, each head's conv tower and its output convs;
* Faster R-CNN: ``backbone`` → the RPN head on every level; the RoI box head on the pooled levels.
  RoI pooling (``MultiScaleRoIAlign``) reads boxes, so the trunk stands in a ``adaptive_avg_pool2d`` to
  the same output size, summed over the pooled levels: channel c still becomes the block of 7x7
  features the box head reads as channel c, which is all the channel graph needs (the values only
  matter for β folding, where a removed channel's constant pools to the same constant either way).

The heads' outputs are the trunk's outputs, so their channels (classes, box coordinates, centerness)
are never cut. A detector with a branch the trunk does not run (Mask R-CNN's mask head, keypoints)
gets a trunk that stops at the FPN: its levels are outputs, kept whole.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from slimnet.core.submodule import ModelView, resolve_submodule
from slimnet.loops.lightning.slimming_callback import SlimmingCallback

log = logging.getLogger(__name__)


def _runs_every_consumer(detector: nn.Module) -> bool:
    """False for a detector with a branch reading the FPN that the trunk does not model."""
    if isinstance(detector, GeneralizedRCNN):
        roi = detector.roi_heads
        return not (getattr(roi, "mask_roi_pool", None) is not None or getattr(roi, "keypoint_roi_pool", None) is not None)
    return isinstance(detector, (RetinaNet, FCOS))


class DetectorTrunk(ModelView):
    """Backbone (+FPN) and the heads' convolutional layers of ``detector``, under the detector's names.

    ``forward(x)``: ``x`` is the (N, 3, H, W) batch the backbone receives (after the detector's
    transform); returns a tuple of the heads' raw output maps (or the FPN's levels, see the module
    docstring). The modules are the detector's own objects: cutting the trunk cuts the detector.
    """

    def __init__(self, detector: nn.Module):
        super().__init__(detector)  # the plan a cut leaves on the trunk lives on the detector
        self.backbone = detector.backbone
        self.whole = _runs_every_consumer(detector)
        if not self.whole:
            return
        if isinstance(detector, GeneralizedRCNN):
            self.rpn, self.roi_heads = detector.rpn, detector.roi_heads
            pool = detector.roi_heads.box_roi_pool
            self.pooled = list(pool.featmap_names)
            size = pool.output_size
            self.pool_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            self.fcos = False
        else:
            self.head = detector.head
            self.fcos = isinstance(detector, FCOS)

    def forward(self, x: torch.Tensor) -> tuple:
        features = self.backbone(x)  # OrderedDict: level name -> (N, C, h, w)
        if not self.whole:
            return tuple(features.values())
        if hasattr(self, "head"):
            return self._one_stage(list(features.values()))
        return self._two_stage(features)

    def _one_stage(self, levels: list) -> tuple:
        cls, reg = self.head.classification_head, self.head.regression_head
        out = []
        for f in levels:
            out.append(cls.cls_logits(cls.conv(f)))
            r = reg.conv(f)
            out.append(reg.bbox_reg(r))
            if self.fcos:
                out.append(reg.bbox_ctrness(r))
        return tuple(out)

    def _two_stage(self, features: dict) -> tuple:
        head = self.rpn.head
        out = []
        for f in features.values():  # RPNHead.forward, per level
            t = head.conv(f)
            out.append(head.cls_logits(t))
            out.append(head.bbox_pred(t))
        pooled = None
        for name in self.pooled:  # stands in for MultiScaleRoIAlign (see the module docstring)
            p = F.adaptive_avg_pool2d(features[name], self.pool_size)
            pooled = p if pooled is None else pooled + p
        h = self.roi_heads.box_head(pooled)
        predictor = self.roi_heads.box_predictor  # its forward checks x.dim(): call its layers
        out.append(predictor.cls_score(h))
        out.append(predictor.bbox_pred(h))
        return tuple(out)


class DetectorSlimmingCallback(SlimmingCallback):
    """``SlimmingCallback`` for a torchvision detector inside a LightningModule: traces and cuts the
    detector's trunk (``DetectorTrunk``), so channels leaving the scope are cut on both sides.

    Args:
        module: the detector's dotted name in the LightningModule (``"model"`` in a ``DetectionTask``);
            the plan is kept under it and replays on a freshly built detector.
        example_input: the trunk's input, the (1, 3, H, W) transformed image
            (``PruneScope.trunk_input``).
        within: the scope, relative to the detector: ``"backbone.body"``, ``"backbone"`` or ``""`` (all);
            only groups whose norms all lie inside, and rank all their producers, are cut
            (``slimnet.engine.plan.restrict_to``).
        **kwargs: the rest of ``SlimmingCallback``'s arguments (policy, epoch, min_channels, …).
    """

    def __init__(self, *, module: str, example_input, within: str, **kwargs):
        super().__init__(module=module, example_input=example_input, module_input=True, within=within, **kwargs)
        self._trunk: DetectorTrunk | None = None

    def _target(self, pl_module) -> nn.Module:
        detector = resolve_submodule(pl_module, self.module, "SlimmingCallback")
        if self._trunk is None or self._trunk.backbone is not detector.backbone:
            self._trunk = DetectorTrunk(detector)
            if not self._trunk.whole:
                log.warning("%s has a branch reading the FPN that the trunk does not model (mask or keypoint "
                            "head): the FPN's output channels are kept whole", type(detector).__name__)
        return self._trunk

    def _fed(self, pl_module) -> nn.Module:
        return self._target(pl_module).backbone  # the trunk's input is the backbone's
