"""``python -m slimnet.export`` on a cut detector: a tiny detection run (the CLI's own, on the tiny
synthetic set) exports to TorchScript and ONNX, and the exported file, loaded as a deployment would,
gives the detections PyTorch gives; ``pt2`` is refused with one line."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_detection_cli import TINY_DETECTION

from slimnet import export as export_cli  # python -m slimnet.export
from slimnet.run.pipeline import train
from slimnet.tasks.detection.export import load_detector

pytest.importorskip("pycocotools", reason="mAP needs the detection extra: pip install -e '.[detection]'")
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


def test_a_cut_detector_exports_and_detects_what_pytorch_detects(compose_cfg, tmp_path, single_thread, capsys):
    results = train(compose_cfg(*TINY_DETECTION, "test=false", "model.score_thresh=0.001"), tmp_path)
    assert results["after"]["flops"] < results["before"]["flops"]  # a cut detector

    assert export_cli.main([str(tmp_path), "format=torchscript", "batch=2"]) == 0
    out = capsys.readouterr().out
    assert "torchscript check on 2 random 64x64 images" in out and "OK" in out
    # independently of the command's own check: torch.jit.load, as a deployment would
    detector, _, _ = load_detector(tmp_path)
    image = torch.rand(3, 64, 64)
    scripted = torch.jit.load(str(tmp_path / "detector.torchscript.pt"))
    with torch.no_grad():
        (expected,) = detector([image])
        _, (got,) = scripted([image])
    assert len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=1e-4, atol=1e-4)

    if HAS_ONNX:  # the TorchScript-based ONNX exporter, torchvision's own path
        assert export_cli.main([str(tmp_path / "checkpoints" / "last.ckpt"), "format=onnx", "batch=2"]) == 0
        assert "onnx check" in capsys.readouterr().out and (tmp_path / "detector.onnx").stat().st_size > 0

    assert export_cli.main([str(tmp_path), "format=pt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch.export cannot capture a torchvision detector" in err


def test_the_export_check_matches_detections_ranked_differently_among_equal_scores():
    from slimnet.tasks.detection.export import _in_order_of

    ref = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]), "labels": torch.tensor([1, 2, 1]),
           "scores": torch.tensor([0.5, 0.5, 0.5])}
    swapped = {k: v[[1, 0, 2]] for k, v in ref.items()}  # another runtime ranked the tie its own way
    for key in ref:
        torch.testing.assert_close(_in_order_of(swapped, ref)[key], ref[key])
    other = {**swapped, "labels": torch.tensor([2, 2, 1])}  # not the same detections: left for the check to fail
    assert not torch.equal(_in_order_of(other, ref)["labels"], ref["labels"])
