"""Does the FLOPs cut become real CPU speed? Pruned vs unpruned latency, timed interleaved (ABBA).

    python scripts/bench_latency.py                    # ~8 min on 2 CPU cores; writes docs/bench_latency.{md,json}
    python scripts/bench_latency.py --skip-resnet      # the default model only, ~3 min
    python scripts/bench_latency.py --threads 2        # steadier with 1 thread when the cores are shared

Three measurements, each model pair (or set) timed call by call in turn so machine drift cancels:

1. The default model (``vgg_small``, Fashion-MNIST 28x28) pruned at several points: BatchNorm γ drawn
   from U(0, 1) (seed 0) and cut with ``slimnet.prune(percent=p)``, plus the channel widths a real default
   run kept (``python -m slimnet.train``: percent 0.7 on trained γ). For each: speed-up ÷ FLOPs reduction
   (1.0 = latency fell as much as FLOPs did) at batch 1 and 16, per backend. Target (issue 6): >= 0.9 at
   batch 16.
2. ``round_to`` N in {1, 4, 8, 16, 32} for the default model at percent 0.7: which N is fastest here.
3. torchvision resnet50 (224x224, 1000 classes, random γ) cut to ~50% FLOPs with ``slimnet.prune``.

Random weights are fine: latency does not depend on values, only on shapes. See ``slimnet/latency.py``
for how each number is taken.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import slimnet
from slimnet.latency import BACKENDS, compare_latency, interleaved_latency
from slimnet.models import create_model
from slimnet.models.build import build_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"arch": "vgg_small", "num_classes": 10, "in_channels": 1}  # conf/model/vgg_small.yaml + data
PERCENTS = (0.3, 0.5, 0.7)  # 0.7 is conf/prune/default.yaml
# Widths kept by a real default run (python -m slimnet.train, percent 0.7 on trained γ, test acc 91.9%):
# its results.json "channels". Early layers keep more than a uniform cut, the late 256s keep ~20%.
TRAINED_CFG = [20, "M", 38, "M", 54, 50, "M", 42, 56]
ROUND_TO = (1, 4, 8, 16, 32)


def random_gammas(model: nn.Module, seed: int = 0) -> nn.Module:
    """γ ~ U(0, 1): a non-uniform importance, so a global percent cuts layers unevenly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen))
    return model


def pruned(model: nn.Module, example: torch.Tensor, **policy) -> tuple[nn.Module, dict]:
    cut = copy.deepcopy(model)
    report = slimnet.prune(cut, example, **policy)
    return cut, report


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def percent_for_flops(model: nn.Module, example: torch.Tensor, keep: float, steps: int = 7) -> float:
    """Bisection on ``percent`` until the pruned model keeps about ``keep`` of the FLOPs."""
    lo, hi = 0.0, 0.95
    for _ in range(steps):
        mid = (lo + hi) / 2
        _, report = pruned(model, example, percent=mid)
        lo, hi = (mid, hi) if report["flops_after"] / report["flops_before"] > keep else (lo, mid)
    return (lo + hi) / 2


def sweep(args) -> list[dict]:
    example = torch.zeros(1, 1, 28, 28)
    base = random_gammas(build_model(DEFAULT))
    points = [(f"percent={p} (random γ)", *pruned(base, example, percent=p)) for p in PERCENTS]
    trained = create_model("vgg", num_classes=10, in_channels=1, cfg=TRAINED_CFG)
    points.append(("trained default run", trained, None))
    flops_a = slimnet.count_flops(base, example)[0]
    out = []
    for name, model, _ in points:
        flops_b = slimnet.count_flops(model, example)[0]
        print(f"[sweep] {name}: widths {widths(model)}", flush=True)
        result = compare_latency(base, model, example, batch_sizes=(1, 16), warmup=args.warmup,
                                 repeats=args.repeats, backends=args.backends, threads=args.threads,
                                 flops=(flops_a, flops_b))
        out.append({"point": name, "widths": widths(model), "flops": [flops_a, flops_b], **result})
    return out


def round_to(args) -> dict:
    example = torch.zeros(1, 1, 28, 28)
    base = random_gammas(build_model(DEFAULT))
    models = {"unpruned": base}
    flops = {"unpruned": slimnet.count_flops(base, example)[0]}
    for n in ROUND_TO:
        model, report = pruned(base, example, percent=0.7, round_to=n)
        models[f"round_to={n}"], flops[f"round_to={n}"] = model, report["flops_after"]
        print(f"[round_to] {n}: widths {widths(model)}", flush=True)
    result = interleaved_latency(models, example, batch_sizes=(1, 16), warmup=args.warmup, repeats=args.repeats,
                                 backends=args.backends, threads=args.threads)
    return {"flops": flops, "widths": {k: widths(m) for k, m in models.items()}, **result}


def resnet50(args) -> dict:
    example = torch.zeros(1, 3, 224, 224)
    base = random_gammas(create_model("torchvision", num_classes=1000, in_channels=3, name="resnet50"))
    percent = percent_for_flops(base, example, keep=0.5)
    model, report = pruned(base, example, percent=percent)
    print(f"[resnet50] percent={percent:.3f} keeps {report['flops_after'] / report['flops_before']:.1%} FLOPs",
          flush=True)
    backends = [b for b in args.backends if b != "compile" or args.resnet_compile]
    result = compare_latency(base, model, example, batch_sizes=(1, 16), warmup=2, repeats=args.resnet_repeats,
                             backends=backends, threads=args.threads,
                             flops=(report["flops_before"], report["flops_after"]))
    return {"percent": percent, "flops": [report["flops_before"], report["flops_after"]], **result}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _pair_cells(row: dict) -> str:
    return (f"{row['a']['median_ms']:.2f} → {row['b']['median_ms']:.2f} | {row['speedup']:.2f}× "
            f"({row['speedup_p25']:.2f}–{row['speedup_p75']:.2f}) | **{row['efficiency']:.2f}**")


def markdown(data: dict) -> str:
    setup = data["setup"]
    lines = [
        "# Latency of pruned models on CPU",
        "",
        f"`python scripts/bench_latency.py` on {setup['cpu']} ({setup['cores']} cores), torch {setup['torch']}, "
        f"onnxruntime {setup['onnxruntime']}, {setup['threads']} thread(s), {setup['repeats']} timed calls per "
        f"model after {setup['warmup']} warm-up calls, models interleaved call by call (ABBA). Load average "
        f"{setup['load_start']} at the start, {setup['load_end']} at the end, took {setup['minutes']:.1f} min.",
        "",
        "Cells: median ms unpruned → pruned | speed-up = median ratio (p25–p75 of the per-round ratios) | "
        "**efficiency** = speed-up ÷ FLOPs reduction (1.0: latency fell as much as FLOPs).",
        "",
        "## Default model (vgg_small, 28x28): the sweep",
        "",
        "| point | FLOPs ÷ | backend | b1 ms | b1 speed-up | b1 eff. | b16 ms | b16 speed-up | b16 eff. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point in data["sweep"]:
        by_backend = {}
        for row in point["rows"]:
            by_backend.setdefault(row["backend"], {})[row["batch"]] = row
        fr = point["flops"][0] / point["flops"][1]
        for backend, rows in by_backend.items():
            lines.append(f"| {point['point']} | {fr:.2f}× | {backend} | {_pair_cells(rows[1])} | "
                         f"{_pair_cells(rows[16])} |")
        for backend, reason in point["unavailable"].items():
            lines.append(f"| {point['point']} | {fr:.2f}× | {backend} | unavailable: {reason} |||||| ")
    verdict = {}
    for point in data["sweep"]:
        for row in point["rows"]:
            if row["batch"] == 16:
                verdict.setdefault(row["backend"], []).append(row["efficiency"])
    lines += ["", "Target (issue 6): efficiency >= 0.9 at batch 16 at every point. Worst point per backend: "
              + ", ".join(f"{b} {min(v):.2f} ({'met' if min(v) >= 0.9 else 'not met'})" for b, v in verdict.items())
              + "."]

    rt = data["round_to"]
    lines += ["", "## round_to (default model, percent=0.7, random γ)", "",
              "Median ms per call; all six models timed in turn in one run. Rounding up keeps more channels "
              "(more FLOPs), so N only helps where the kernels prefer aligned widths.", ""]
    names = list(rt["flops"])
    lines.append("| backend | batch | " + " | ".join(names) + " | fastest pruned |")
    lines.append("|---|---|" + "---|" * len(names) + "---|")
    lines.append("| MFLOPs | | " + " | ".join(f"{rt['flops'][n] / 1e6:.1f}" for n in names) + " | |")
    table = {}
    for row in rt["rows"]:
        table.setdefault((row["backend"], row["batch"]), {})[row["model"]] = row["median_ms"]
    for (backend, batch), ms in table.items():
        best = min((n for n in names if n != "unpruned"), key=ms.get)
        lines.append(f"| {backend} | {batch} | " + " | ".join(f"{ms[n]:.2f}" for n in names) + f" | {best} |")
    lines.append("")
    lines.append("Widths: " + "; ".join(f"{k} {v}" for k, v in rt["widths"].items()))

    if data.get("resnet50"):
        r = data["resnet50"]
        lines += ["", f"## torchvision resnet50 (224x224, 1000 classes), percent={r['percent']:.3f} -> "
                  f"{r['flops'][1] / r['flops'][0]:.1%} of the FLOPs ({r['setup']['repeats']} timed calls)", "",
                  "| backend | b1 ms | b1 speed-up | b1 eff. | b16 ms | b16 speed-up | b16 eff. |",
                  "|---|---|---|---|---|---|---|"]
        by_backend = {}
        for row in r["rows"]:
            by_backend.setdefault(row["backend"], {})[row["batch"]] = row
        for backend, rows in by_backend.items():
            lines.append(f"| {backend} | {_pair_cells(rows[1])} | {_pair_cells(rows[16])} |")
        for backend, reason in r["unavailable"].items():
            lines.append(f"| {backend} | unavailable: {reason} |||||| ")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every backend")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per model (default model)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resnet-repeats", type=int, default=10, help="timed calls per model (resnet50)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--resnet-compile", action="store_true", help="also torch.compile resnet50 (slow)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_latency"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()

    start = time.perf_counter()
    load_start = os.getloadavg()
    data = {"sweep": sweep(args), "round_to": round_to(args)}
    data["resnet50"] = None if args.skip_resnet else resnet50(args)
    data["setup"] = {**data["sweep"][0]["setup"], "load_start": [round(x, 2) for x in load_start],
                     "load_end": [round(x, 2) for x in os.getloadavg()],
                     "minutes": (time.perf_counter() - start) / 60, "python": platform.python_version()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
