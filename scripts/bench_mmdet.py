"""mmdet's ResNet-50-FPN cut by slimnet: FLOPs and parameters before and after, exactness, time.

    python scripts/bench_mmdet.py                        # ~2 min on 2 CPU cores; prints a markdown table
    python scripts/bench_mmdet.py --size 512 512 --json out.json

Needs ``pip install mmengine mmdet==3.3.0 mmcv-lite==2.1.0`` (or a compiled mmcv). With mmcv-lite,
``import mmdet.models`` fails on mmcv's compiled ops, so ResNet and FPN are imported alone (their
packages stubbed) and built from mmdet's own registry, as Faster R-CNN's config builds them:
``ResNet(depth=50, frozen_stages=1, norm_eval=True)`` and ``FPN([256, 512, 1024, 2048] -> 256, 5 levels)``,
random init (``init_weights``).

What it measures, on ``slimnet.loops.mmengine.Trunk`` (backbone -> FPN, under the model's own names,
traced on one (1, 3, H, W) image, ``within="backbone"``: the FPN's lateral convs lose the channels the
backbone's stages lose; its outputs are kept whole):

* γ drawn so the thresholds bite, like after a sparse phase: in every trainable BatchNorm, 40 % of the
  channels get |γ| ~ U(0, 0.1) (what L1 leaves near zero), the rest U(0.2, 1); β ~ N(0, 0.1); the frozen
  stages (stem and layer1, ``requires_grad=False``) keep γ = 1 and are never ranked. One seed.
* ``thresh=0.17`` and ``percent=0.3``: FLOPs (2 x multiply-adds, slimnet's count, at the image size)
  and parameters of the trunk before and after, and the wall time of ``slimnet.prune`` (trace, plan,
  fold, cut and the FLOPs report) with its surgery part.
* exactness: γ = β = 0 on every channel below 0.17, then ``thresh=0.17``: the largest absolute
  difference of the FPN's outputs before and after, beside their largest magnitude.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import logging
import sys
import time
import types
import warnings
from pathlib import Path

import torch
from torch import nn

import slimnet
from slimnet.loops.mmengine import Trunk


def mmdet_models():
    """mmdet's MODELS registry with ResNet and FPN registered, with or without mmcv's compiled ops."""
    import mmdet

    if importlib.util.find_spec("mmcv._ext") is not None:
        importlib.import_module("mmdet.models")
    else:
        root = Path(mmdet.__file__).parent / "models"
        for name, folder in (("mmdet.models", root), ("mmdet.models.layers", root / "layers"),
                             ("mmdet.models.backbones", root / "backbones"),
                             ("mmdet.models.necks", root / "necks")):
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(folder)]
                sys.modules[name] = package
        res_layer = importlib.import_module("mmdet.models.layers.res_layer")
        sys.modules["mmdet.models.layers"].ResLayer = res_layer.ResLayer
        importlib.import_module("mmdet.models.backbones.resnet")
        importlib.import_module("mmdet.models.necks.fpn")
    from mmdet.registry import MODELS

    return MODELS


class ResNet50FPN(nn.Module):
    """Faster R-CNN R-50-FPN's backbone and neck, as configs/_base_/models/faster-rcnn_r50_fpn.py has them."""

    def __init__(self, models):
        super().__init__()
        from mmengine.registry import DefaultScope

        backbone = {"type": "ResNet", "depth": 50, "num_stages": 4, "out_indices": (0, 1, 2, 3),
                    "frozen_stages": 1, "norm_cfg": {"type": "BN", "requires_grad": True}, "norm_eval": True,
                    "style": "pytorch"}
        neck = {"type": "FPN", "in_channels": [256, 512, 1024, 2048], "out_channels": 256, "num_outs": 5}
        with DefaultScope.overwrite_default_scope("mmdet"):  # as an mmdet config's default_scope does
            self.backbone, self.neck = models.build(backbone), models.build(neck)


@torch.no_grad()
def draw_gammas(model: nn.Module, seed: int) -> None:
    """Like after a sparse phase: 40 % of each trainable norm's |γ| ~ U(0, 0.1), the rest U(0.2, 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad:
            n = m.num_features
            low = torch.rand(n, generator=g) < 0.4
            small, large = 0.1 * torch.rand(n, generator=g), 0.2 + 0.8 * torch.rand(n, generator=g)
            m.weight.copy_(torch.where(low, small, large))
            m.bias.normal_(0, 0.1, generator=g)


@torch.no_grad()
def zero_below(model: nn.Module, thresh: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad:
            small = m.weight.abs() <= thresh
            m.weight[small] = 0
            m.bias[small] = 0


def cut(model: nn.Module, x: torch.Tensor, **policy) -> dict:
    trunk = Trunk(model)
    start = time.perf_counter()
    report = slimnet.prune(trunk, x, within="backbone", **policy)
    seconds = time.perf_counter() - start
    return {"policy": policy, "flops_before": report.flops_before, "flops_after": report.flops_after,
            "params_before": report.params_before, "params_after": report.params_after,
            "prune_seconds": seconds, "surgery_seconds": report.seconds.get("surgery"),
            "seconds": report.seconds, "lateral_in": [c.conv.in_channels for c in model.neck.lateral_convs]}


def versions() -> dict:
    out = {name: importlib.import_module(name).__version__ for name in ("torch", "mmengine", "mmcv", "mmdet")}
    if importlib.util.find_spec("mmcv._ext") is None:
        out["mmcv"] += " (lite: no compiled ops)"
    return out


def table(rows: list[dict]) -> str:
    columns = ["policy", "γ", "GFLOPs before → after", "params (M) before → after", "prune() s (surgery s)",
               "exactness"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        policy = ", ".join(f"{k}={v}" for k, v in r["policy"].items())
        exact = "max_abs_diff" in r
        gammas = "γ = β = 0 below 0.17" if exact else "drawn"
        exactness = (f"max abs diff {r['max_abs_diff']:.1e} (outputs up to {r['max_abs_output']:.1f})"
                     if exact else "")
        saved = 100 * (1 - r["flops_after"] / r["flops_before"])
        lines.append(f"| {policy} | {gammas} | {r['flops_before'] / 1e9:.1f} → {r['flops_after'] / 1e9:.1f} "
                     f"(−{saved:.0f} %) | {r['params_before'] / 1e6:.2f} → {r['params_after'] / 1e6:.2f} | "
                     f"{r['prune_seconds']:.1f} ({r['surgery_seconds']:.1f}) | {exactness} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1344),
                        help="H W (mmdet pads 800x1333 to this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("mmengine").setLevel(logging.WARNING)  # init_weights' per-parameter lines
    warnings.filterwarnings("ignore", message="prune: ")  # the frozen stages kept whole, said once here
    torch.manual_seed(args.seed)
    base = ResNet50FPN(mmdet_models())
    base.backbone.init_weights()
    base.neck.init_weights()
    draw_gammas(base, args.seed)
    base.eval()
    x = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))

    rows = [cut(copy.deepcopy(base), x, thresh=0.17), cut(copy.deepcopy(base), x, percent=0.3)]
    exact = copy.deepcopy(base)
    zero_below(exact, 0.17)
    with torch.no_grad():
        before = Trunk(exact)(x)
        rows.append(cut(exact, x, thresh=0.17))
        after = Trunk(exact)(x)
    rows[-1]["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(before, after))
    rows[-1]["max_abs_output"] = max(a.abs().max().item() for a in before)

    v = versions()
    print(f"ResNet-50-FPN (mmdet {v['mmdet']}, mmcv {v['mmcv']}, mmengine {v['mmengine']}, "
          f"torch {v['torch']}), input 1x3x{args.size[0]}x{args.size[1]}, {args.threads} threads\n")
    print(table(rows))
    parts = ", ".join(f"{k} {t:.1f}" for k, t in rows[0]["seconds"].items())
    print(f"\nprune() with thresh=0.17, seconds by part: {parts}")
    print(f"FPN lateral convs' inputs after thresh=0.17: {rows[0]['lateral_in']} "
          "(were [256, 512, 1024, 2048])")
    if args.json:
        args.json.write_text(json.dumps({"versions": v, "size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
