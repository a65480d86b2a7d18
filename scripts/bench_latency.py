"""Does the FLOPs cut become real CPU speed? Pruned vs unpruned latency, timed interleaved (ABBA).

    python scripts/bench_latency.py               # ~4 min on 2 cores; writes docs/bench_latency.{md,json}
    python scripts/bench_latency.py --skip-resnet # the default model only, ~2.5 min
    python scripts/bench_latency.py --render      # rewrite the .md from the .json (no timing)
    python scripts/bench_latency.py --threads 2   # default 1: steadier when other jobs share the cores
    python scripts/bench_latency.py --default-sweep  # the trained default sweep's points only (issue 6's
                                                     # target); writes docs/bench_latency_sweep.{md,json}

Three measurements, each model pair (or set) timed call by call in turn so machine drift cancels:

1. The default model (``vgg_small``, Fashion-MNIST 28x28) pruned at several points: BatchNorm γ drawn
   from U(0, 1) (seed 0) and cut with ``slimnet.prune(percent=p)``, plus the channel widths a real default
   run kept (the earlier default recipe, λ=2e-3 and percent 0.7 on trained γ: docs/ were measured with
   it). For each: speed-up ÷ FLOPs reduction
   (1.0 = latency fell as much as FLOPs did) at batch 1 and 16, per backend. Target (issue 6): >= 0.9 at
   batch 16.
2. ``round_to`` N in {1, 4, 8, 16, 32} for the default model at percent 0.7: which N is fastest here.
3. torchvision resnet50 (224x224, 1000 classes, random γ) cut to ~50% FLOPs with ``slimnet.prune``.

Random weights are fine: latency does not depend on values, only on shapes. See ``slimnet/deploy/latency.py``
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
from slimnet.deploy.latency import BACKENDS, compare_latency, interleaved_latency
from slimnet.models import create_model
from slimnet.models.build import build_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"arch": "vgg_small", "num_classes": 10, "in_channels": 1}  # conf/model/vgg_small.yaml + data
PERCENTS = (0.3, 0.5, 0.7)  # 0.7 is conf/prune/default.yaml
# Widths kept by a real run of the earlier default recipe (λ=2e-3, percent 0.7 on trained γ, test acc
# 91.96%): its results.json "channels". docs/bench_latency.* were measured with these; the current
# default's widths are in DEFAULT_SWEEP below. Early layers keep more than a uniform cut.
TRAINED_CFG = [20, "M", 38, "M", 54, 50, "M", 42, 56]
# Widths kept by real runs of the current default recipe (seed 0, one shared sparse phase): the default
# run (percent 0.63) and the README's threshold sweep (+prune.thresh=0.01,0.05,0.1,0.2), each from its
# results.json "channels". `--default-sweep` times these: the points issue 6's target is about.
DEFAULT_SWEEP = {
    "default run (percent=0.63)": [26, "M", 51, "M", 62, 62, "M", 32, 87],
    "+prune.thresh=0.01": [27, "M", 54, "M", 83, 88, "M", 100, 107],
    "+prune.thresh=0.05": [26, "M", 53, "M", 78, 80, "M", 52, 97],
    "+prune.thresh=0.1": [25, "M", 45, "M", 44, 43, "M", 22, 81],
    "+prune.thresh=0.2": [14, "M", 11, "M", 4, 4, "M", 4, 55],
}
# The narrowest models surgery can leave of this architecture: every conv at prune.min_channels (4, the
# default floor) or at 1 (min_channels=1). No cut of vgg_small runs faster than the faster of them, so
# their speed-up bounds what any point can reach: efficiency >= 0.9 is out of reach wherever the FLOPs
# reduction exceeds bound speed-up / 0.9. `--default-sweep` times them beside the sweep's points.
BOUNDS = {
    "bound: every conv 4 wide": [4, "M", 4, "M", 4, 4, "M", 4, 4],
    "bound: every conv 1 wide": [1, "M", 1, "M", 1, 1, "M", 1, 1],
}
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
    if args.default_sweep:
        points = [(name, create_model("vgg", num_classes=10, in_channels=1, cfg=cfg), None)
                  for name, cfg in {**DEFAULT_SWEEP, **BOUNDS}.items()]
    else:
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
        out.append({"point": name, "widths": widths(model), "flops": [flops_a, flops_b],
                    "bound": name in BOUNDS, **result})
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
    result = interleaved_latency(models, example, batch_sizes=(1, 16), warmup=args.warmup,
                                 repeats=args.repeats, backends=args.backends, threads=args.threads)
    return {"flops": flops, "widths": {k: widths(m) for k, m in models.items()}, **result}


def resnet50(args) -> dict:
    example = torch.zeros(1, 3, 224, 224)
    base = random_gammas(create_model("torchvision", num_classes=1000, in_channels=3, name="resnet50"))
    percent = percent_for_flops(base, example, keep=0.5)
    model, report = pruned(base, example, percent=percent)
    kept = report["flops_after"] / report["flops_before"]
    print(f"[resnet50] percent={percent:.3f} keeps {kept:.1%} of the FLOPs", flush=True)
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


def _min_speedup(row: dict) -> float:
    """Speed-up from the fastest calls: another job can only add time, so min is the quiet machine."""
    return row["a"]["min_ms"] / row["b"]["min_ms"]


def _min_efficiency(row: dict) -> float:
    return _min_speedup(row) / row["flops_speedup"]


def _by_backend(rows: list[dict]) -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for row in rows:
        table.setdefault(row["backend"], {})[row["batch"]] = row
    return table


def _round_to_lines(rt: dict) -> list[str]:
    names = list(rt["flops"])
    lines = ["", "## round_to (default model, percent=0.7, random γ)", "",
             ("Median ms per call, the six models timed in turn in one run. Rounding up keeps more channels "
              "(more FLOPs): N pays only where kernels run aligned widths faster."), "",
             "| backend | batch | " + " | ".join(names) + " | fastest pruned |",
             "|---|---|" + "---|" * len(names) + "---|",
             "| MFLOPs | | " + " | ".join(f"{rt['flops'][n] / 1e6:.1f}" for n in names) + " | |"]
    table: dict[tuple, dict[str, float]] = {}
    for row in rt["rows"]:
        table.setdefault((row["backend"], row["batch"]), {})[row["model"]] = row["median_ms"]
    for (backend, batch), ms in table.items():
        best = min((n for n in names if n != "unpruned"), key=ms.get)
        lines.append(f"| {backend} | {batch} | " + " | ".join(f"{ms[n]:.2f}" for n in names) + f" | {best} |")
    return lines + ["", "Widths: " + "; ".join(f"{k} {v}" for k, v in rt["widths"].items())]


def _bound_lines(bounds: list[dict], points: list[dict]) -> list[str]:
    """What any cut of this architecture can reach: the speed-up of the narrowest models surgery can leave."""
    lines = ["", "## What any cut can reach (batch 16)", "",
             ("The narrowest models surgery can leave of vgg_small, timed against the same unpruned model: no "
              "cut with that `prune.min_channels` runs faster, so efficiency >= 0.9 is out of reach at any "
              "point whose FLOPs reduction exceeds (their speed-up) / 0.9. The speed-up used is the higher of "
              "the median and the fastest-call estimates (the one kinder to the target)."), "",
             "| model | FLOPs ÷ | backend | b16 ms | b16 speed-up | b16 speed-up (min) |", "|---|---|---|---|---|---|"]
    verdicts = []
    for bound in bounds:
        ratio = bound["flops"][0] / bound["flops"][1]
        for backend, rows in _by_backend(bound["rows"]).items():
            row = rows[16]
            quiet = _min_speedup(row)
            lines.append(f"| {bound['point']} {bound['widths']} | {ratio:.0f}× | {backend} | "
                         f"{row['a']['median_ms']:.2f} → {row['b']['median_ms']:.2f} | {row['speedup']:.2f}× | "
                         f"{quiet:.2f}× |")
            limit = max(row["speedup"], quiet) / 0.9
            out = [p["point"] for p in points if p["flops"][0] / p["flops"][1] > limit]
            verdicts.append(f"- {bound['point'].removeprefix('bound: ')}, {backend}: efficiency >= 0.9 needs a "
                            f"FLOPs reduction <= {limit:.1f}×; out of reach at: "
                            + (", ".join(out) if out else "no point of this sweep") + ".")
    return lines + [""] + verdicts


def markdown(data: dict) -> str:
    s = data["setup"]
    lines = [
        "# Latency of pruned models on CPU",
        "",
        (f"`python scripts/bench_latency.py` on {s['cpu']} ({s['cores']} cores), torch {s['torch']}, "
         f"onnxruntime {s['onnxruntime']}, {s['threads']} thread(s) for every backend, {s['repeats']} timed "
         f"calls per model after {s['warmup']} warm-up calls, the models timed call by call in turn (ABBA). "
         f"Load average {s['load_start'][0]} at the start, {s['load_end'][0]} at the end (other jobs shared "
         f"the cores); {s['minutes']:.1f} min."),
        "",
        ("Cells: median ms unpruned → pruned | speed-up = ratio of the medians (p25–p75 of the per-round "
         "ratios) | **efficiency** = speed-up ÷ FLOPs reduction (1.0: latency fell as much as FLOPs did). "
         "eff. (min) takes the fastest call of each model instead of the median: other jobs only add time, "
         "so it is the quiet-machine estimate, and where it disagrees with the median the timings were "
         "bimodal (calls of a few ms that were or were not preempted)."),
        "",
        "## Default model (vgg_small, 28x28, 45.3 MFLOPs)",
        "",
        ("| point | FLOPs ÷ | backend | b1 ms | b1 speed-up | b1 eff. | b16 ms | b16 speed-up | b16 eff. "
         "| b16 eff. (min) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[str, list[float]] = {}
    points = [p for p in data["sweep"] if not p.get("bound")]
    for point in points:
        ratio = point["flops"][0] / point["flops"][1]
        for backend, rows in _by_backend(point["rows"]).items():
            lines.append(f"| {point['point']} | {ratio:.2f}× | {backend} | {_pair_cells(rows[1])} | "
                         f"{_pair_cells(rows[16])} | {_min_efficiency(rows[16]):.2f} |")
            worst.setdefault(backend, []).append(min(rows[16]["efficiency"], _min_efficiency(rows[16])))
        for backend, reason in point["unavailable"].items():
            lines.append(f"| {point['point']} | {ratio:.2f}× | {backend} | unavailable: {reason} ||||||")
    lines += ["", "Conv widths kept: " + "; ".join(f"{p['point']} {p['widths']}" for p in points),
              "", ("Target (issue 6): efficiency >= 0.9 at batch 16 at every point. Worst point per backend "
                   "(lower of the two estimates): "
                   + ", ".join(f"{b} {min(w):.2f} ({'met' if min(w) >= 0.9 else 'not met'})"
                               for b, w in worst.items()) + ".")]

    bounds = [p for p in data["sweep"] if p.get("bound")]
    if bounds:
        lines += _bound_lines(bounds, points)
    if data.get("round_to"):
        lines += _round_to_lines(data["round_to"])

    if data.get("resnet50"):
        r = data["resnet50"]
        lines += ["", (f"## torchvision resnet50 (224x224, 1000 classes): percent={r['percent']:.3f} keeps "
                       f"{r['flops'][1] / r['flops'][0]:.1%} of {r['flops'][0] / 1e9:.2f} GFLOPs "
                       f"({r['setup']['repeats']} timed calls per model)"), "",
                  "| backend | b1 ms | b1 speed-up | b1 eff. | b16 ms | b16 speed-up | b16 eff. |",
                  "|---|---|---|---|---|---|---|"]
        for backend, rows in _by_backend(r["rows"]).items():
            lines.append(f"| {backend} | {_pair_cells(rows[1])} | {_pair_cells(rows[16])} |")
        for backend, reason in r["unavailable"].items():
            lines.append(f"| {backend} | unavailable: {reason} ||||||")
    lines += ["", "## How to read this", "", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """\
- Backends: `eager` = plain PyTorch (NCHW); `channels_last` = the same model and input in NHWC memory
  format; `compile` = `torch.compile(model, dynamic=False)` (inductor, default options); `onnxruntime` =
  the `python -m slimnet.export` ONNX file in onnxruntime's CPU provider. Each backend times its own
  unpruned and pruned model, so a speed-up never mixes backends.
- One thread (`--threads`, default 1) because the two cores are shared: with two threads every parallel
  region waits for the busy core, and single calls of a sub-millisecond model then stall for tens to
  hundreds of ms, which no amount of interleaving averages out.
- FLOPs count convs and linears; BatchNorm, ReLU and max-pool cost memory traffic that falls only
  linearly with the channels kept (FLOPs fall about quadratically), and narrow convs run at a lower
  FLOP rate than wide ones: both pull efficiency below 1 as the cut deepens.
- Random γ (U(0, 1)) gives a near-uniform cut per layer; the "trained default run" widths are the
  non-uniform structure real slimming produces (early layers keep more)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every backend")
    parser.add_argument("--repeats", type=int, default=150, help="timed calls per model (default model)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resnet-repeats", type=int, default=10, help="timed calls per model (resnet50)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--resnet-compile", action="store_true", help="also torch.compile resnet50 (slow)")
    parser.add_argument("--default-sweep", action="store_true",
                        help="time only the trained default sweep's widths (no round_to, no resnet50)")
    parser.add_argument("--out", default=None, help="writes OUT.md, OUT.json (default: docs/bench_latency, "
                        "or docs/bench_latency_sweep with --default-sweep)")
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    out = Path(args.out or ROOT / "docs" / ("bench_latency_sweep" if args.default_sweep else "bench_latency"))
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return

    start = time.perf_counter()
    load_start = os.getloadavg()
    data = {"sweep": sweep(args), "round_to": None if args.default_sweep else round_to(args)}
    data["resnet50"] = None if args.skip_resnet or args.default_sweep else resnet50(args)
    data["setup"] = {**data["sweep"][0]["setup"], "load_start": [round(x, 2) for x in load_start],
                     "load_end": [round(x, 2) for x in os.getloadavg()],
                     "minutes": (time.perf_counter() - start) / 60, "python": platform.python_version()}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
