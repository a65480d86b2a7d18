"""Detector building, prune scopes, whole-detector FLOPs and FrozenBN conversion on whole detectors.
Random weights only (nothing is downloaded); resnet18 with a 64-channel FPN at 64 px."""

from __future__ import annotations

import pytest
import torch
from test_detection_norms import _randomise_frozen
from torch import nn
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from slimnet.engine.measure import count_flops
from slimnet.sparsity.norms import unfreeze_batchnorm
from slimnet.tasks.detection.measure import detector_flops
from slimnet.tasks.detection.models import build_detector
from slimnet.tasks.detection.scope import prune_scope

KINDS = ["fasterrcnn", "retinanet", "fcos"]
IMAGE = (64, 80)  # not square and not a multiple of 32: the detector pads it to 64 x 96


def _detector(kind: str, num_classes: int = 3, **kw) -> nn.Module:
    torch.manual_seed(0)
    if kind == "fasterrcnn":  # 1000 proposals by default: the RoI head would be most of the test's time
        kw.setdefault("rpn_post_nms_top_n_test", 50)
    return build_detector(kind, "resnet18", num_classes, min_size=64, max_size=128, fpn_channels=64, **kw).eval()


def _capture(detector: nn.Module, module: nn.Module) -> tuple[torch.Tensor, dict]:
    """What ``module`` receives and returns in one eval forward of the detector on a zero image."""
    seen = {}
    pre = module.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    post = module.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        detector([torch.zeros(3, *IMAGE)])
    pre.remove()
    post.remove()
    return seen["in"], seen["out"]


def _in_width(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scope", ["backbone", "backbone+neck"])
def test_scope_gives_the_submodule_its_real_input_and_the_layers_reading_its_channels(single_thread, kind, scope):
    detector = _detector(kind)
    root = nn.Module()
    root.model = detector  # as inside a DetectionTask
    s = prune_scope(detector, scope, IMAGE, prefix="model")

    target = root.get_submodule(s.module)
    assert s.module == {"backbone": "model.backbone.body", "backbone+neck": "model.backbone"}[scope]
    real_in, real_out = _capture(detector, target)
    (x,) = s.example_input
    assert x.shape == real_in.shape == (1, 3, 64, 96)  # after the detector's resize and padding
    torch.testing.assert_close(x, real_in)  # normalised with the detector's own mean/std

    # every output leaves through the listed layers, whose input width is that output's
    assert set(s.consumers) == set(real_out)
    for key, layers in s.consumers.items():
        assert layers
        for name in layers:
            layer = root.get_submodule(name)
            c = real_out[key].shape[1]
            assert _in_width(layer) in (c, c * 7 * 7), (key, name)  # 7x7: the RoI head's pooled features


@pytest.mark.parametrize("kind", KINDS)
def test_never_cut_holds_every_layer_whose_width_is_set_by_the_classes(kind):
    """Layers whose output width changes with num_classes are the class outputs: never cut. The box
    outputs are listed as well (checked by name)."""
    a, b = _detector(kind, num_classes=2), _detector(kind, num_classes=5)
    s = prune_scope(a, "backbone", IMAGE)
    widths_b = {n: getattr(m, "out_channels", getattr(m, "out_features", None)) for n, m in b.named_modules()}
    class_set = {n for n, m in a.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                 and getattr(m, "out_channels", getattr(m, "out_features", None)) != widths_b[n]}
    assert class_set and class_set <= set(s.never_cut)
    for name in s.never_cut:
        a.get_submodule(name)  # resolves
    assert any("bbox" in n for n in s.never_cut)


def test_scope_all_and_unknown_scope():
    detector = _detector("fcos")
    s = prune_scope(detector, "all", IMAGE, prefix="model")
    assert s.module == "model" and s.consumers == {}
    assert isinstance(s.example_input[0], list) and s.example_input[0][0].shape == (3, *IMAGE)
    with pytest.raises(ValueError, match="backbone, backbone\\+neck, all"):
        prune_scope(detector, "head", IMAGE)


@pytest.mark.parametrize("kind", KINDS)
def test_detector_flops_split_and_match_an_independent_count(single_thread, kind):
    detector = _detector(kind).train()
    flops = detector_flops(detector, IMAGE)
    assert detector.training and detector.backbone.body.training  # modes restored
    assert flops["total"] == flops["backbone"] + flops["neck"] + flops["heads"]
    assert min(flops.values()) > 0
    # the backbone share is what counting the body alone on its real input gives
    body_flops, _ = count_flops(detector.backbone.body, prune_scope(detector, "backbone", IMAGE).example_input)
    assert flops["backbone"] == body_flops
    # what counts is the size the detector resizes to: 128 x 160 (no padding) against 64 x 96 (padded
    # from 64 x 80) is 3.33 times the pixels
    torch.manual_seed(0)
    larger = build_detector(kind, "resnet18", 3, min_size=128, max_size=256, fpn_channels=64,
                            **({"rpn_post_nms_top_n_test": 50} if kind == "fasterrcnn" else {}))
    assert 3.1 < detector_flops(larger, IMAGE)["backbone"] / flops["backbone"] < 3.6


def test_two_stage_flops_do_not_depend_on_how_many_proposals_survive_nms(single_thread):
    """Comparable before/after a cut: the RoI head is counted on exactly the RPN's proposal budget."""
    detector = _detector("fasterrcnn", rpn_post_nms_top_n_test=50)
    before = detector_flops(detector, IMAGE)
    torch.manual_seed(1)
    for p in detector.rpn.head.parameters():  # wild boxes: most are clipped away or suppressed
        nn.init.normal_(p, std=1.0)
    assert detector_flops(detector, IMAGE) == before
    # the RoI head's share is 50 proposals' worth: fc6 alone is 2 * in * out FLOPs a proposal
    fc6 = detector.roi_heads.box_head.fc6
    assert before["heads"] > 50 * 2 * fc6.in_features * fc6.out_features
    assert "filter_proposals" not in vars(detector.rpn)  # the method is the class's again


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_detector_converts_to_batchnorm_with_the_same_features(single_thread, kind):
    detector = _detector(kind, norm="frozen")
    assert isinstance(detector.backbone.body.bn1, FrozenBatchNorm2d)
    _randomise_frozen(detector)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = detector.backbone(x)
    unfreeze_batchnorm(detector)
    assert type(detector.backbone.body.bn1) is nn.BatchNorm2d and detector.backbone.body.bn1.weight.requires_grad
    with torch.no_grad():
        after = detector.backbone(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4)


def test_backbone_weights_load_from_a_local_torchvision_checkpoint(tmp_path):
    torch.manual_seed(3)
    classifier = resnet18(weights=None)
    classifier.bn1.running_var.uniform_(0.5, 2.0)  # statistics a pretrained network would have
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    detector = _detector("retinanet", backbone_weights=str(path), norm="batchnorm_eval").train()
    torch.testing.assert_close(detector.backbone.body.layer3[1].conv2.weight, classifier.layer3[1].conv2.weight)
    torch.testing.assert_close(detector.backbone.body.bn1.running_var, classifier.bn1.running_var)
    # batchnorm_eval: trainable γ on the loaded statistics, which training does not move
    bn1 = detector.backbone.body.bn1
    assert not bn1.training and bn1.weight.requires_grad
    detector.backbone(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(bn1.running_var, classifier.bn1.running_var)

    # another network's file: other keys, or the same keys with other shapes
    wrong_keys = {**classifier.state_dict(), "layer5.0.conv1.weight": torch.zeros(1)}
    wrong_shape = {**classifier.state_dict(), "conv1.weight": torch.zeros(8, 3, 7, 7)}
    for name, state in (("keys", wrong_keys), ("shape", wrong_shape)):
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match="does not fit this backbone") as info:
            _detector("retinanet", backbone_weights=str(tmp_path / f"{name}.pth"))
        assert "model.backbone_weights" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "yolo"}, "fasterrcnn, retinanet, fcos"),
    ({"backbone": "vit_b_16"}, "resnet18"),
    ({"norm": "groupnorm"}, "batchnorm, batchnorm_eval, frozen"),
    ({"kind": "fcos", "fpn_channels": 32}, "multiple of 32"),
    ({"kind": "fcos", "rpn_post_nms_top_n_test": 100}, "not arguments of FCOS"),  # torchvision would ignore it
])
def test_build_errors_name_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_detector(**{"kind": "retinanet", "backbone": "resnet18", "num_classes": 2, **kwargs})
