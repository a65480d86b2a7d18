"""Cuts inside and across a prune scope's boundary are exact, with FrozenBatchNorm2d, on Faster R-CNN,
RetinaNet and FCOS: γ = β = 0 on random channels of every group the scope may cut, then the cut (on
the detector's trunk, restricted to the scope) leaves the backbone+FPN outputs and the heads' outputs
unchanged. Channels leaving the scope are cut on both sides (the FPN's lateral convs, the heads'
first layers lose the matching inputs); the heads' class and box outputs keep their widths.

The FPN is rebuilt with FrozenBN after its convs so that the FPN → heads boundary has norms to rank
(torchvision's default FPN has none, and then there is nothing there to cut)."""

from __future__ import annotations

import pytest
import torch
from test_detection_models import IMAGE, _detector
from test_detection_norms import _randomise_frozen
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

import slimnet
from slimnet.engine.plan import restrict_to
from slimnet.graph import trace_channel_groups
from slimnet.tasks.detection.scope import prune_scope
from slimnet.tasks.detection.trunk import DetectorTrunk

KINDS = ["fasterrcnn", "retinanet", "fcos"]


def _frozen_detector(kind: str) -> nn.Module:
    detector = _detector(kind, norm="frozen")
    fpn = detector.backbone.fpn
    torch.manual_seed(1)
    detector.backbone.fpn = FeaturePyramidNetwork([b[0].in_channels for b in fpn.inner_blocks], 64,
                                                  extra_blocks=fpn.extra_blocks, norm_layer=FrozenBatchNorm2d)
    _randomise_frozen(detector)
    return detector.eval()


def _zero_random_channels(trunk: nn.Module, x: torch.Tensor, within, seed: int = 0) -> dict[str, int]:
    """γ = β = 0 on a random third of every group the scope may cut; returns norm -> channels zeroed."""
    graph = restrict_to(trace_channel_groups(trunk, (x,)), within)
    g = torch.Generator().manual_seed(seed)
    zeroed = {}
    for group in graph.groups:
        if not group.prunable:
            continue
        drop = torch.randperm(group.size, generator=g)[: group.size // 3]
        for ref in group.norms:
            norm = trunk.get_submodule(ref.module)
            for c in drop.tolist():
                idx = slice(ref.offset + c * ref.mult, ref.offset + (c + 1) * ref.mult)
                norm.weight[idx] = 0.0
                norm.bias[idx] = 0.0
            zeroed[ref.module] = zeroed.get(ref.module, 0) + len(drop) * ref.mult
    return zeroed


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def _out_width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope", ["backbone", "backbone+neck", "all"])
def test_cut_across_the_scope_boundary_is_exact_with_frozen_bn(single_thread, kind, scope):
    detector = _frozen_detector(kind)
    s = prune_scope(detector, scope, IMAGE)
    trunk = DetectorTrunk(detector).eval()
    (x,) = s.trunk_input
    zeroed = _zero_random_channels(trunk, x, s.within)
    assert zeroed and all(n.startswith(s.within) for n in zeroed)  # only norms inside the scope
    with torch.no_grad():
        fpn_before = detector.backbone(x)
        heads_before = trunk(x)
    consumers = sorted({n for names in s.consumers.values() for n in names})
    in_before = {n: _in_width(detector.get_submodule(n)) for n in consumers}
    out_before = {n: _out_width(detector.get_submodule(n)) for n in s.never_cut}

    report = slimnet.prune(trunk, x, thresh=0.0, within=s.within, cut_frozen=True)  # exactly the zeroed channels go

    for norm, n in zeroed.items():  # every zeroed channel was removed, and only those
        assert report.channels[norm] == [report.channels[norm][0], report.channels[norm][0] - n]
    with torch.no_grad():
        heads_after = trunk(x)
    for before, after in zip(heads_before, heads_after, strict=True):  # the heads' answers, unchanged
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert {n: _out_width(detector.get_submodule(n)) for n in s.never_cut} == out_before
    in_after = {n: _in_width(detector.get_submodule(n)) for n in consumers}
    if scope == "backbone" or kind == "fasterrcnn":
        assert all(in_after[n] < in_before[n] for n in consumers)  # both sides of the boundary were cut
    else:  # P6/P7 come from convs with no norm, merged with the FPN's levels by the heads: kept whole
        assert in_after == in_before
        reasons = [r for g in report.groups for r in g["frozen_by"]]
        assert any("extra_blocks.p6" in r and "no norm" in r for r in reasons)
    if scope == "backbone":  # the FPN's own channels are outside the scope: its levels keep their width
        with torch.no_grad():
            fpn_after = detector.backbone(x)
        for key in fpn_before:
            torch.testing.assert_close(fpn_after[key], fpn_before[key], rtol=1e-4, atol=1e-4)
    # the real detector, on its own forward (image list, anchors, NMS), still runs and agrees
    assert detector.slimnet_plan is report.plan
    with torch.no_grad():
        (out,) = detector([torch.zeros(3, *IMAGE)])
    assert set(out) == {"boxes", "scores", "labels"}


def test_torchvision_fpn_without_norms_keeps_the_fpn_to_heads_channels(single_thread):
    """torchvision's FPN has no norm, so its output channels have no γ to rank: backbone+neck cuts the
    body (and the FPN's lateral inputs), never the FPN's levels."""
    detector = _detector("retinanet", norm="frozen")
    _randomise_frozen(detector)
    s = prune_scope(detector, "backbone+neck", IMAGE)
    trunk = DetectorTrunk(detector).eval()
    widths = {n: _out_width(m) for n, m in detector.backbone.fpn.named_modules() if isinstance(m, nn.Conv2d)}
    _zero_random_channels(trunk, *s.trunk_input, s.within)
    slimnet.prune(trunk, s.trunk_input, thresh=0.0, within=s.within, cut_frozen=True)
    assert {n: _out_width(m) for n, m in detector.backbone.fpn.named_modules() if isinstance(m, nn.Conv2d)} == widths
    lateral = detector.backbone.fpn.inner_blocks[0][0]  # reads layer2's output: cut with it
    assert lateral.in_channels == detector.backbone.body.layer2[-1].bn2.weight.numel() == 128 - 128 // 3
