"""Export a cut torchvision detector, then prove the file detects what PyTorch detects.

    python -m slimnet.export outputs/<detection run>                   # its checkpoints/last.ckpt -> ONNX
    python -m slimnet.export outputs/<detection run> format=torchscript
    python -m slimnet.export outputs/<run>/checkpoints/last.ckpt format=onnx batch=4

``slimnet.export`` hands a detection run (``results.json`` with ``"task": "detection"``) or a Lightning
checkpoint (``.ckpt``) here. The detector is rebuilt at its cut widths with ``load_checkpoint``.

What torchvision supports, measured with this torch (2.14) and torchvision:

- ``torchscript``: ``torch.jit.script`` (torchvision's detectors are written to script; tracing would
  freeze the number of boxes). The scripted detector returns ``(losses, detections)``.
- ``onnx``: the TorchScript-based exporter (``dynamo=False``, opset 17), torchvision's own ONNX path,
  for one image of a fixed size (that of the check). The dynamo exporter (``dynamo=True``) fails: it
  is built on ``torch.export``, which cannot capture proposals and NMS (data-dependent shapes).
- ``pt2`` (``torch.export``): refused with a one-line message, for the same reason.

The check runs PyTorch and the exported file on ``batch`` images (random, fixed seed) of the run's
image size and compares the detections: the same number and labels per image, boxes and scores within
``atol + rtol * max|box|``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

DEFAULT_OPSET = 17  # torchvision's detection ONNX tests use 11+; 17 is what the legacy exporter knows well
REFUSED = {"pt2": "format=pt2: torch.export cannot capture a torchvision detector (its proposals and NMS "
                  "have data-dependent shapes); use format=torchscript or format=onnx"}


def load_detector(source: str | Path) -> tuple[nn.Module, tuple[int, int], Path]:
    """``(detector in eval mode at its cut widths, image size (H, W), checkpoint path)``."""
    from slimnet.loops.lightning.checkpoint import load_checkpoint
    from slimnet.tasks.detection.task import DetectionTask

    source = Path(source)
    ckpt = source / "checkpoints" / "last.ckpt" if source.is_dir() else source
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: no such file (a detection run saves checkpoints/last.ckpt)")
    task = load_checkpoint(ckpt, DetectionTask)
    return task.model.eval(), task.image_size, ckpt


def _canonical(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """An order of detections that does not depend on how equal scores were ranked: by label, then by
    the box (rounded to 1/100 pixel, so float noise between runtimes does not reorder)."""
    key = torch.cat([d["labels"].double()[:, None], (d["boxes"].double() * 100).round()], 1)
    order = torch.arange(len(key))
    for col in reversed(range(key.shape[1])):  # a stable sort per column, last key first: lexicographic
        order = order[torch.argsort(key[order, col], stable=True)]
    return order


def _in_order_of(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``got`` in ``ref``'s order when both hold the same detections ranked differently among (near-)equal
    scores (an untrained detector's scores tie by the hundred, and two runtimes break ties their own
    way); else ``got`` as it is, for the caller to find the difference."""
    if len(got["boxes"]) != len(ref["boxes"]) or torch.equal(got["labels"].long(), ref["labels"].long()):
        return got
    mine, theirs = _canonical(got), _canonical(ref)
    placed = torch.empty_like(theirs)
    placed[theirs] = mine  # ref's i-th detection is got's placed[i]
    return {k: v[placed] if isinstance(v, torch.Tensor) and len(v) == len(placed) else v for k, v in got.items()}


def _detections(outputs) -> list[dict[str, torch.Tensor]]:
    """Per image ``{boxes, scores, labels}`` from PyTorch, a scripted detector or an ONNX session."""
    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], list):
        outputs = outputs[1]  # scripted: (losses, detections)
    return [{k: d[k].float() if k != "labels" else d[k] for k in ("boxes", "scores", "labels")} for d in outputs]


def _export_torchscript(detector: nn.Module, images: list[torch.Tensor], path: Path, opset=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and torchvision's scripting notes
        scripted = torch.jit.script(detector)
        torch.jit.save(scripted, str(path))

    def run(image: torch.Tensor) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _detections(loaded([image]))[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    return run


def _export_onnx(detector: nn.Module, images: list[torch.Tensor], path: Path, opset=None):
    from slimnet.deploy.export import onnx_session

    names = list(detector(images[:1])[0])  # the outputs, in the detector's own order (FCOS: boxes, scores, …)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(detector, (images[:1],), str(path), dynamo=False, opset_version=opset or DEFAULT_OPSET,
                          input_names=["image"], output_names=names)
    session = onnx_session(path)

    def run(image: torch.Tensor) -> dict:
        out = dict(zip(names, session.run(None, {"image": image.numpy()})))
        return {k: torch.from_numpy(out[k]).float() if k != "labels" else torch.from_numpy(out[k])
                for k in ("boxes", "scores", "labels")}

    return run


EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript}
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def export_detector(source: str | Path, format: str = "onnx", out: str | Path | None = None, batch: int = 4,
                    opset: int | None = None, atol: float = 1e-4, rtol: float = 1e-4, input_size=None, **_):
    """What ``python -m slimnet.export`` does for a detection run: load, export, check; an ``ExportReport``.

    ``input_size`` (``H`` or ``HxW``) overrides the run's image size for the check (and the ONNX file).
    """
    from slimnet.deploy.export import ExportReport, parse_size

    if format in REFUSED:
        raise ValueError(REFUSED[format])
    if format not in EXPORTERS:
        raise ValueError(f"unknown format {format!r} for a detector; choose one of: {', '.join(EXPORTERS)}")
    detector, size, ckpt = load_detector(source)
    size = parse_size(input_size) if input_size is not None else size
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, *size, generator=gen) for _ in range(max(1, batch))]
    with torch.inference_mode():
        reference = [_detections(detector([image]))[0] for image in images]
    path = Path(out) if out else ckpt.parent.parent / f"detector{SUFFIXES[format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        run = EXPORTERS[format](detector, images, path, opset)
    seconds = time.perf_counter() - start
    diff, same, scale = 0.0, 0, 0.0
    with torch.inference_mode():
        for image, ref in zip(images, reference):
            got = _in_order_of(run(image), ref)
            scale = max(scale, float(ref["boxes"].abs().max()) if len(ref["boxes"]) else 0.0)
            if got["boxes"].shape != ref["boxes"].shape or not torch.equal(got["labels"].long(), ref["labels"].long()):
                diff = float("inf")
                continue
            same += 1
            if len(ref["boxes"]):
                diff = max(diff, float((got["boxes"] - ref["boxes"]).abs().max()),
                           float((got["scores"] - ref["scores"]).abs().max()))
    tolerance = atol + rtol * scale
    n_boxes = sum(len(r["boxes"]) for r in reference)
    return ExportReport(path=str(path), format=format,
                        inputs=f"{len(images)} random {size[0]}x{size[1]} images ({n_boxes} detections)",
                        max_abs_diff=diff, tolerance=tolerance, top1_agreement=same / len(images),
                        passed=diff <= tolerance, export_seconds=seconds)
