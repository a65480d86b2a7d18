"""FLOPs of a whole torchvision detector at a fixed input size, split into backbone, neck and heads.

Counted like ``slimnet.measure.count_flops``: ``torch.utils.flop_counter.FlopCounterMode`` (2 x MACs),
one image, eval mode. A detector's cost depends on its input in one place: a two-stage detector runs
its RoI head once per proposal, and how many proposals survive the RPN's NMS depends on the image
and the weights, so cutting the backbone could change the count through the proposals alone. To make
counts comparable before and after a cut, the RPN's NMS is switched off while counting (threshold 1.0):
the RoI head then sees the RPN's full budget of ``post_nms_top_n`` proposals (1000 by default, or
all anchors' top-n when fewer), the worst case. One-stage detectors (RetinaNet, FCOS) are dense and
need no such care.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimnet._modes import preserved_modes


@contextlib.contextmanager
def _worst_case_proposals(detector: nn.Module):
    rpn = getattr(detector, "rpn", None)
    if rpn is None:
        yield
        return
    before = rpn.nms_thresh
    rpn.nms_thresh = 1.0  # NMS suppresses only IoU > 1: nothing, so the proposal count is the budget
    try:
        yield
    finally:
        rpn.nms_thresh = before


@torch.no_grad()
def detector_flops(detector: nn.Module, image_size: tuple[int, int] | int) -> dict[str, int]:
    """``{"total", "backbone", "neck", "heads"}`` FLOPs of one forward on one (3, H, W) image.

    ``backbone`` is the body (``detector.backbone.body``), ``neck`` the FPN and ``heads`` the rest
    (RPN + RoI head, or the dense heads), all at ``image_size`` before the detector's own resize. The
    train/eval mode of every module is restored afterwards.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    # a fixed, non-constant image: a zero image can make degenerate proposals that the RPN drops
    image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    with preserved_modes(detector), _worst_case_proposals(detector):
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
