"""Surgery on models nobody here wrote: ultralytics YOLOv8n, timm, segmentation-models-pytorch.

These packages are test-only extras (``pip install slimnet[thirdparty]``); each test skips, with the
reason, when its package is missing. Exactness as in ``test_reach.py``: channels whose γ and β are zero
emit zero, so cutting them must not move the outputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slimnet
from slimnet.graph import NORM_TYPES

pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


@torch.no_grad()
def _kill_weak(model: nn.Module, thresh: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen))
            m.running_mean.copy_(torch.randn(m.weight.shape, generator=gen) * 0.1)
            dead = m.weight < thresh
            m.weight[dead], m.bias[dead] = 0, 0


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def test_yolov8n_c2f_and_sppf_are_cut_exactly_and_returned_features_kept():
    pytest.importorskip("ultralytics", reason="ultralytics is a test-only extra: pip install slimnet[thirdparty]")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = slimnet.reach(model, x)
    assert r.flops >= 0.5 and r.bn_channels >= 0.5  # the target: C2f is no longer left whole
    _kill_weak(model)
    with torch.no_grad():
        ref = _leaves(model(x))
    c2f, sppf, detect = model.model[2], model.model[9], model.model[22]
    widths = (c2f.cv1.conv.out_channels, sppf.cv2.conv.in_channels, detect.cv2[0][0].conv.in_channels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    assert c2f.cv1.conv.out_channels < widths[0] and c2f.cv1.conv.out_channels % 2 == 0  # chunk(2) halves agree
    assert c2f.m[0].cv1.conv.in_channels == c2f.cv1.conv.out_channels // 2
    assert sppf.cv2.conv.in_channels < widths[1]  # SPPF's cat of four pooled copies
    # The model also returns the neck outputs the head reads ("feats"): a model output keeps its channels,
    # so the Detect head's inputs stay whole, and the warning says so.
    assert detect.cv2[0][0].conv.in_channels == widths[2]
    assert any("model.15.cv2.conv kept whole: model output" in str(w.message) for w in caught)
    assert report["flops_after"] < 0.8 * report["flops_before"]
    with torch.no_grad():
        out = _leaves(model(x))
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_smp_fpn_with_a_shape_check_is_captured_and_cut_exactly():
    smp = pytest.importorskip("segmentation_models_pytorch",
                              reason="segmentation-models-pytorch is a test-only extra: pip install slimnet[thirdparty]")
    model = smp.FPN("resnet18", encoder_weights=None, classes=2, encoder_depth=3, decoder_pyramid_channels=32,
                    decoder_segmentation_channels=32, upsampling=2).eval()  # small, still shape-checked
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _kill_weak(model)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    assert report["params_after"] < report["params_before"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
