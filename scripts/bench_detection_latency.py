"""Does cutting a detector's backbone make it faster on a CPU? torchvision's Faster R-CNN ResNet-50 FPN.

    OMP_NUM_THREADS=1 python scripts/bench_detection_latency.py            # ~4 min; docs/bench_detection_latency.md
    OMP_NUM_THREADS=1 python scripts/bench_detection_latency.py --repeats 5 --percents 0.3 0.5 0.7

The detector is built as torchvision's ``fasterrcnn_resnet50_fpn`` builds it for pretrained weights
(``resnet50(norm_layer=FrozenBatchNorm2d)``, ``_resnet_fpn_extractor(backbone, 3)``, ``FasterRCNN(…, 91)``:
with ``weights=None, weights_backbone=None`` the builder itself would switch to ``BatchNorm2d``), with
random weights and random FrozenBN γ ~ U(0, 1) (seed 0): latency depends on shapes, not values.
Each cut removes ``percent`` of the backbone body's BN channels ranked globally by |γ|
(``slimnet.prune`` on the detector's trunk, ``within="backbone.body"``: the FPN's lateral convs lose the
matching inputs). Timed at 800x800 (the detector's own resize keeps it at 800x800), one thread, eval
mode, ``inference_mode``: the backbone+FPN on the transformed (1, 3, 800, 800) tensor, and the whole
detector on one image (transform, backbone, RPN, RoI heads with their 1000 proposals, post-processing).
Models are timed in turn, call by call, so drift of the shared machine hits all alike; median of
``--repeats`` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import slimnet
from slimnet.engine.measure import count_flops
from slimnet.tasks.detection.measure import detector_flops
from slimnet.tasks.detection.scope import transformed_input
from slimnet.tasks.detection.trunk import DetectorTrunk

SIZE = (800, 800)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def build(seed: int = 0) -> torch.nn.Module:
    """torchvision's fasterrcnn_resnet50_fpn as built for pretrained weights (FrozenBN), random values."""
    torch.manual_seed(seed)
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    detector = FasterRCNN(_resnet_fpn_extractor(body, 3), num_classes=91).eval()
    g = torch.Generator().manual_seed(seed)
    for m in detector.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g))
    return detector


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percents", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DOCS / "bench_detection_latency.md")
    args = parser.parse_args()
    torch.set_num_threads(1)

    models = {"unpruned": build()}
    x = transformed_input(models["unpruned"], SIZE)  # (1, 3, 800, 800)
    for p in args.percents:
        detector = build()
        start = time.perf_counter()
        report = slimnet.prune(DetectorTrunk(detector), x, percent=p, within="backbone.body")
        print(f"cut {p:.0%} of the body's BN channels in {time.perf_counter() - start:.1f} s "
              f"({len(report.channels)} layers changed)")
        models[f"{p:.0%} cut"] = detector

    rows = {}
    for name, d in models.items():
        backbone_flops, params = count_flops(d.backbone, (x,))
        rows[name] = {"backbone_gflops": backbone_flops / 1e9, "backbone_params_m": params / 1e6,
                      "detector_gflops": detector_flops(d, SIZE)["total"] / 1e9, "backbone_s": [], "detector_s": []}
    image = [torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(1))]
    with torch.inference_mode():
        for d in models.values():  # warm-up
            d.backbone(x)
            d(image)
        for _ in range(args.repeats):  # in turn, call by call
            for name, d in models.items():
                rows[name]["backbone_s"] += timed(lambda d=d: d.backbone(x), 1)
                rows[name]["detector_s"] += timed(lambda d=d: d(image), 1)
    for r in rows.values():
        r["backbone_ms"] = 1e3 * statistics.median(r.pop("backbone_s"))
        r["detector_ms"] = 1e3 * statistics.median(r.pop("detector_s"))
    base = rows["unpruned"]
    lines = [
        "# Cut backbone of Faster R-CNN ResNet-50 FPN: latency on this CPU",
        "",
        f"Command: `OMP_NUM_THREADS=1 python scripts/bench_detection_latency.py --repeats {args.repeats} "
        f"--percents {' '.join(str(p) for p in args.percents)}` (see its docstring for how).",
        "",
        f"torchvision `fasterrcnn_resnet50_fpn` structure with FrozenBatchNorm2d, random weights, random γ; "
        f"{SIZE[0]}x{SIZE[1]} input, one thread, median of {args.repeats} calls after one warm-up; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with other jobs). "
        "The cut: `percent` of the backbone body's BN channels by global |γ| rank, on the trunk "
        "(`within=\"backbone.body\"`, the FPN's lateral convs cut to match).",
        "",
        "| model | backbone+FPN GFLOPs | params (M) | backbone+FPN ms | speed-up | detector GFLOPs | detector ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['backbone_gflops']:.1f} | {r['backbone_params_m']:.1f} | {r['backbone_ms']:.0f} | "
                     f"{base['backbone_ms'] / r['backbone_ms']:.2f}x | {r['detector_gflops']:.1f} | "
                     f"{r['detector_ms']:.0f} | {base['detector_ms'] / r['detector_ms']:.2f}x |")
    lines += ["", "Detector GFLOPs count the RoI head at its test-time budget (1000 proposals), as "
              "`slimnet.tasks.detection.measure.detector_flops` does.", ""]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
