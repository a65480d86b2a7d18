"""FLOPs of a whole torchvision detector at a fixed input size, split into backbone, neck and heads.

Counted like ``slimnet.engine.measure.count_flops``: ``torch.utils.flop_counter.FlopCounterMode`` (2 x MACs),
one image, eval mode. The size that counts is the one the detector resizes to (its ``min_size`` /
``max_size``); ``image_size`` sets the aspect ratio and so the padded shape.

A detector's cost depends on its input in one place: a two-stage detector runs its RoI head once per
proposal, and how many proposals survive the RPN's NMS depends on the image and the weights, so
cutting the backbone would change the count through the proposals alone. To make counts comparable
before and after a cut, the proposals are padded (or cut) to exactly the RPN's budget while counting
(``rpn_post_nms_top_n_test``, 1000 by default): the worst case. One-stage detectors (RetinaNet, FCOS)
are dense and need no such care.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimnet.modes import preserved_modes


def _pad(boxes: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``n`` proposals: the first ``n``, or the last one repeated (a unit box if none)."""
    if len(boxes) == 0:
        boxes, scores = boxes.new_tensor([[0.0, 0.0, 1.0, 1.0]]), scores.new_zeros(1)
    extra = max(0, n - len(boxes))
    return (torch.cat([boxes[:n], boxes[-1:].expand(extra, 4)]), torch.cat([scores[:n], scores[-1:].expand(extra)]))


@contextlib.contextmanager
def _budget_proposals(detector: nn.Module):
    rpn = getattr(detector, "rpn", None)
    if rpn is None:
        yield
        return
    original = rpn.filter_proposals

    def filter_proposals(*args, **kwargs):
        boxes, scores = original(*args, **kwargs)
        padded = [_pad(b, s, rpn.post_nms_top_n()) for b, s in zip(boxes, scores)]
        return [p[0] for p in padded], [p[1] for p in padded]

    rpn.filter_proposals = filter_proposals  # an instance attribute shadows the method while counting
    try:
        yield
    finally:
        del rpn.filter_proposals


@torch.no_grad()
def detector_flops(detector: nn.Module, image_size: tuple[int, int] | int) -> dict[str, int]:
    """``{"total", "backbone", "neck", "heads"}`` FLOPs of one forward on one (3, H, W) image.

    ``backbone`` is the body (``detector.backbone.body``), ``neck`` the FPN and ``heads`` the rest
    (RPN + RoI head on ``rpn_post_nms_top_n_test`` proposals, or the dense heads), for an image of
    ``image_size`` after the detector's own resize. The train/eval mode of every module is restored.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    with preserved_modes(detector), _budget_proposals(detector):
        detector.eval()
        counter = FlopCounterMode(display=False)
        with counter:
            detector([image])
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(detector).__name__
    total = int(counter.get_total_flops())
    body = int(per_module.get(f"{root}.backbone.body", 0))
    backbone = int(per_module.get(f"{root}.backbone", 0))
    return {"total": total, "backbone": body, "neck": backbone - body, "heads": total - backbone}
