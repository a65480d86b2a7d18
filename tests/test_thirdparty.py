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
from slimnet.graph import NORM_TYPES, trace_channel_groups

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


def test_yolov8n_c2f_sppf_and_detect_inputs_are_cut_exactly_and_predictions_kept():
    pytest.importorskip("ultralytics", reason="ultralytics is a test-only extra: pip install slimnet[thirdparty]")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = slimnet.reach(model, x)
    # every BN channel: the neck outputs the model also returns ("feats") are read by the loss for their
    # H, W only (slimnet.graph.SHAPE_ONLY_OUTPUTS), so they no longer keep the Detect head's inputs whole
    assert r.flops == 1.0 and r.bn_channels == 1.0 and not r.frozen
    _kill_weak(model)
    with torch.no_grad():
        y_ref, preds_ref = model(x)
    c2f, sppf, detect = model.model[2], model.model[9], model.model[22]
    widths = (c2f.cv1.conv.out_channels, sppf.cv2.conv.in_channels, detect.cv2[0][0].conv.in_channels)
    outputs = [(seq[-1].out_channels, seq[-1].weight.clone()) for seq in [*detect.cv2, *detect.cv3]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    assert c2f.cv1.conv.out_channels < widths[0] and c2f.cv1.conv.out_channels % 2 == 0  # chunk(2) halves agree
    assert c2f.m[0].cv1.conv.in_channels == c2f.cv1.conv.out_channels // 2
    assert sppf.cv2.conv.in_channels < widths[1]  # SPPF's cat of four pooled copies
    assert detect.cv2[0][0].conv.in_channels < widths[2]  # the head's inputs are cut ...
    assert detect.cv3[0][0].conv.in_channels == detect.cv2[0][0].conv.in_channels
    for seq, (out_channels, _) in zip([*detect.cv2, *detect.cv3], outputs):  # ... never its predictions
        assert seq[-1].out_channels == out_channels
    assert not any("kept whole: model output" in str(w.message) for w in caught)
    assert report["flops_after"] < 0.8 * report["flops_before"]
    with torch.no_grad():
        y, preds = model(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for key in ("boxes", "scores"):
        torch.testing.assert_close(preds[key], preds_ref[key], rtol=1e-4, atol=1e-4)
    for feat, ref in zip(preds["feats"], preds_ref["feats"]):  # narrower, same grid: all the loss reads
        assert feat.shape[2:] == ref.shape[2:] and feat.shape[1] < ref.shape[1]
    # ultralytics' exporter runs C2f.forward_split, which splits at self.c, a width the trace never saw
    assert c2f.c == c2f.cv1.conv.out_channels // 2  # graph.OPS.widths keeps it in step with the cut
    with torch.no_grad():
        torch.testing.assert_close(c2f.forward_split(model.model[1](model.model[0](x))),
                                   c2f(model.model[1](model.model[0](x))))


def test_shape_only_output_keys_are_per_model_class_and_an_output_elsewhere_stays_whole(monkeypatch):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            f = self.bn(self.conv(x))
            return {"pred": self.head(f), "feats": [f]}

    class Twice(Net):
        def forward(self, x):
            out = super().forward(x)
            return {**out, "raw": out["feats"][0]}  # the same tensor also under a key read channel by channel

    monkeypatch.setitem(slimnet.graph.SHAPE_ONLY_OUTPUTS, f"{Net.__module__}.{Net.__qualname__}", ("feats",))
    x = torch.randn(1, 3, 8, 8)
    assert trace_channel_groups(Net(), x).group_of("conv").prunable  # subclasses match along the MRO too
    assert not trace_channel_groups(Twice(), x).group_of("conv").prunable
    monkeypatch.delitem(slimnet.graph.SHAPE_ONLY_OUTPUTS, f"{Net.__module__}.{Net.__qualname__}")
    assert not trace_channel_groups(Net(), x).group_of("conv").prunable


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


@pytest.mark.parametrize("yaml", ["yolo11n.yaml", "yolo26n.yaml"])
def test_yolo11_and_yolo26_are_cut_around_their_attention_and_predictions_kept(yaml):
    """Their attention views ``v`` back with ``C`` from the input's shape, which ``torch.export`` writes
    into the graph as a number: the cut keeps that block's channels whole (it finds it by running the
    cut model) instead of failing, and YOLO26's one-to-one head (it reads ``x.detach()``) is cut too."""
    pytest.importorskip("ultralytics", reason="ultralytics is a test-only extra: pip install slimnet[thirdparty]")
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(yaml, verbose=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    _kill_weak(model)
    with torch.no_grad():
        ref = _leaves(model(x))
    head_in = model.model[-1].cv2[0][0].conv.in_channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slimnet.prune(model, x, thresh=0.1, fold_bias=False)
    said = [str(w.message) for w in caught]
    assert any("'model.10.m.0.attn' (Attention) reads a channel count the trace does not show" in m for m in said)
    assert not any("detach" in m for m in said)
    assert report["flops_after"] < 0.8 * report["flops_before"]
    assert model.model[-1].cv2[0][0].conv.in_channels < head_in
    if hasattr(model.model[-1], "one2one_cv2"):
        assert model.model[-1].one2one_cv2[0][0].conv.in_channels == model.model[-1].cv2[0][0].conv.in_channels
    with torch.no_grad():
        out = _leaves(model(x))
    same = [(y, y_ref) for y, y_ref in zip(out, ref, strict=True) if y.shape == y_ref.shape]
    assert out[0].shape == ref[0].shape and len(same) >= 3  # the predictions; the neck's features are narrower
    for y, y_ref in same:
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
