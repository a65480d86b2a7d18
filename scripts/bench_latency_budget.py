"""The latency-budget study of issue 27: Torch-Pruning's slimming at -50 % FLOPs against slimnet's FLOPs policy
and slimnet's latency policy, on resnet50 at 224, one thread, batch 1 and 16; and what the latency table costs.

    python scripts/bench_latency_budget.py                          # every part, into docs/bench_latency_budget.json
    python scripts/bench_latency_budget.py --parts resnet50_b1      # one part; parts already in the JSON are kept
    python scripts/bench_latency_budget.py --parts resnet50_b16 --force   # measure a part again
    python scripts/bench_latency_budget.py --markdown               # print the JSON's rows as markdown tables
    python scripts/bench_latency_budget.py --smoke                  # seconds: tiny model and settings, a temp JSON

Run it on a quiet machine: every timing is interleaved (ABBA) and the load average is recorded, but a busy
core still widens the spread. The JSON is written after each part, so the study runs in parts (resumable).

Parts:

* ``resnet50_b1`` / ``resnet50_b16``: torchvision resnet50 (``weights=None``; every BatchNorm γ drawn uniform
  in [0, 1) with seed 0, as scripts/bench_surgery.py does: an untrained model has every γ = 1), input
  224×224, one intra-op thread, batch 1 or 16. Five models from the same weights:

  1. ``full``: uncut;
  2. ``torch_pruning``: Torch-Pruning's ``BNScalePruner(BNScaleImportance(), global_pruning=True,
     ignored_layers=[fc])`` at the largest pruning ratio whose FLOPs are within 50 % (bisection);
  3. ``slimnet_flops``: ``slimnet.prune(target_flops=F)``, F = Torch-Pruning's FLOPs share (equal FLOPs);
  4. ``slimnet_latency``: ``slimnet.prune(target_latency=T)``, T = Torch-Pruning's measured latency share (full
     and Torch-Pruning timed interleaved first), with a latency table at that batch and one thread (its
     cost, predicted and measured fractions are kept);
  5. ``slimnet_flops_at_latency``: ``slimnet.prune(target_flops=F')`` with F' bisected on measured latency
     until its latency share is T's (equal latency: what the latency policy's FLOPs are compared with).

  Then all five are timed interleaved (``--repeats`` rounds); each row has FLOPs, parameters, median and
  p25-p75 latency, and the per-round latency ratio to Torch-Pruning's model. The issue's targets:
  ``slimnet_flops`` / ``torch_pruning`` latency <= 1.0 at equal FLOPs, and ``slimnet_latency`` keeping >= 10 %
  more FLOPs than ``slimnet_flops_at_latency`` at equal latency.
* ``table_cost``: the default model (vgg_small, 1×28×28, Fashion-MNIST's shape) — its latency table built
  from nothing with the default settings at batch 1 and 16 (one thread), against one training epoch:
  ``--epoch-steps`` SGD steps of batch 128 in channels_last with torch's thread count, as the default run
  trains, times the 430 steps of an epoch (55 000 images).

Torch-Pruning is a benchmark-only dependency (``pip install torch-pruning``); slimnet never imports it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from slimnet.engine.atomic import atomic_write
from slimnet.engine.cut import prune
from slimnet.engine.latency_table import LatencySettings, build_latency_table, device_name, time_models
from slimnet.engine.measure import count_flops
from slimnet.models import create_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench_latency_budget.json"
EPOCH_STEPS, EPOCH_BATCH = 430, 128  # conf/data/fashion_mnist.yaml: 55 000 training images, batch 128


# --------------------------------------------------------------------------------------------------
# Settings of a run (full study or smoke)
# --------------------------------------------------------------------------------------------------


def study(smoke: bool) -> dict:
    if smoke:
        return {"model": "resnet18", "size": 64, "batches": (1, 2), "repeats": 4, "tp_steps": 4, "match_steps": 2,
                "latency": {"grid": (0.5, 1.0), "steps": (8, 16), "warmup": 1, "repeats": 2, "model_repeats": 3},
                "table_batches": (1,), "table_latency": {"grid": (0.5, 1.0), "steps": (8,), "warmup": 1, "repeats": 2,
                                                          "model_repeats": 3},
                "epoch_steps": 3, "epoch_batch": 16}
    return {"model": "resnet50", "size": 224, "batches": (1, 16), "repeats": 30, "tp_steps": 14, "match_steps": 6,
            "latency": {}, "table_batches": (1, 16), "table_latency": {}, "epoch_steps": 30,
            "epoch_batch": EPOCH_BATCH}


def env() -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_pruning": version("torch-pruning"),
            "device": device_name(), "cores": os.cpu_count(), "torch_threads_default": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# --------------------------------------------------------------------------------------------------
# Models and cuts
# --------------------------------------------------------------------------------------------------


def base_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen)
    return model


def torch_pruning_cut(model: nn.Module, x: torch.Tensor, target: float, steps: int) -> tuple[nn.Module, float]:
    """Torch-Pruning's BN-scale slimming at the largest ratio within ``target`` × FLOPs (bisection)."""
    import torch_pruning as tp

    flops0 = count_flops(model, x)[0]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        probe = copy.deepcopy(model)
        pruner = tp.pruner.BNScalePruner(probe, x, tp.importance.BNScaleImportance(), global_pruning=True,
                                         pruning_ratio=mid, ignored_layers=[probe.fc])
        pruner.step()
        if count_flops(probe, x)[0] <= target * flops0:
            hi, best = mid, (probe.eval(), mid)
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning: no ratio up to {hi} reaches {target} of the FLOPs")
    return best


def slimnet_cut(model: nn.Module, x: torch.Tensor, **policy) -> tuple[nn.Module, dict]:
    cut = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(cut, x, **policy)
    details = {"warnings": [str(w.message)[:300] for w in caught]}
    if "latency" in report:
        latency = report["latency"]
        steps: dict[int, int] = {}
        for r in latency["rounding"].values():
            steps[r["step"]] = steps.get(r["step"], 0) + 1
        details.update({"predicted": latency["predicted"], "measured": latency["measured"],
                        "table_seconds": latency["table"]["seconds"], "table_source": latency["table"]["source"],
                        "table_path": latency["table"]["path"], "solve_seconds": latency["solve_seconds"],
                        "rounding_steps": {str(k): v for k, v in sorted(steps.items())}})
    return cut.eval(), details


def latency_share(full: nn.Module, other: nn.Module, x: torch.Tensor, settings: LatencySettings,
                  repeats: int) -> float:
    """Median of the per-round latency ratios other / full, timed interleaved."""
    base, cut = time_models([full, other], x, settings, repeats=repeats)
    return statistics.median(c / b for c, b in zip(cut, base))


def flops_at_latency(model, x, share: float, settings: LatencySettings, steps: int, repeats: int) -> tuple:
    """``target_flops`` bisected on the cut model's measured latency share until it brackets ``share``: the
    FLOPs policy at equal latency. Returns the probe at or under ``share`` (else the last one), and every
    probe ``(target_flops, measured share, FLOPs kept)``."""
    flops0 = count_flops(model, x)[0]
    lo, hi, best, last, probes = 0.05, 1.0, None, None, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        cut, details = slimnet_cut(model, x, target_flops=mid)
        measured = latency_share(model, cut, x, settings, repeats)
        probes.append((mid, measured, count_flops(cut, x)[0] / flops0))
        last = (cut, mid, measured, details)
        if measured <= share:
            lo, best = mid, last
        else:
            hi = mid
    return (*(best or last), probes)


def interpolated_flops(probes: list[tuple[float, float, float]], share: float) -> float | None:
    """FLOPs kept at latency share ``share``, linear between the nearest probes under and over it (None when the
    probes do not bracket it)."""
    under = [p for p in probes if p[1] <= share]
    over = [p for p in probes if p[1] > share]
    if not under or not over:
        return None
    (_, s0, f0), (_, s1, f1) = max(under, key=lambda p: p[1]), min(over, key=lambda p: p[1])
    return f0 + (f1 - f0) * (share - s0) / (s1 - s0) if s1 > s0 else f0


def describe(model: nn.Module, x: torch.Tensor, flops0: int) -> dict:
    flops, params = count_flops(model, x)
    return {"flops": flops, "flops_kept": flops / flops0, "params": params}


def resnet_part(cfg: dict, batch: int, cache_dir: str) -> dict:
    x = torch.zeros(1, 3, cfg["size"], cfg["size"])
    model = base_model(cfg["model"])
    flops0 = count_flops(model, x)[0]
    timing = LatencySettings(batch=batch, threads=1, warmup=3 if cfg["repeats"] > 5 else 1)
    started, load = time.perf_counter(), round(os.getloadavg()[0], 2)

    tp_model, ratio = torch_pruning_cut(model, x, 0.5, cfg["tp_steps"])
    tp_flops = count_flops(tp_model, x)[0] / flops0
    tp_share = latency_share(model, tp_model, x, timing, cfg["repeats"])
    print(f"  torch_pruning: ratio {ratio:.3f}, FLOPs kept {tp_flops:.3f}, latency share {tp_share:.3f}", flush=True)

    flops_model, flops_details = slimnet_cut(model, x, target_flops=tp_flops)
    settings = {"batch": batch, "threads": 1, "cache_dir": cache_dir, **cfg["latency"]}
    latency_model, latency_details = slimnet_cut(model, x, target_latency=tp_share, latency_settings=settings)
    print(f"  slimnet latency policy: table {latency_details['table_seconds']:.1f} s, predicted "
          f"{latency_details['predicted']['fraction']:.3f}, measured "
          f"{(latency_details['measured'] or {}).get('fraction', float('nan')):.3f}", flush=True)
    # equal latency means the latency model's own measured share (it can miss its target: a stale table, a
    # busy core), so the FLOPs policy is bisected to that, not to the target
    aim = (latency_details["measured"] or {}).get("fraction", tp_share)
    match_model, match_target, match_share, match_details, probes = flops_at_latency(
        model, x, aim, timing, cfg["match_steps"], max(cfg["repeats"] // 2, 3))
    print(f"  slimnet FLOPs policy at that latency: target_flops {match_target:.3f} (share {match_share:.3f})",
          flush=True)

    models = {"full": model, "torch_pruning": tp_model, "slimnet_flops": flops_model,
              "slimnet_latency": latency_model, "slimnet_flops_at_latency": match_model}
    times = time_models(list(models.values()), x, LatencySettings(batch=batch, threads=1, warmup=timing.warmup),
                        repeats=cfg["repeats"])
    by_name = dict(zip(models, times))
    rows = {}
    for name, seconds in by_name.items():
        ms = sorted(s * 1e3 for s in seconds)
        q = statistics.quantiles(ms, n=4, method="inclusive")
        vs_tp = sorted(a / b for a, b in zip(seconds, by_name["torch_pruning"]))
        qt = statistics.quantiles(vs_tp, n=4, method="inclusive")
        vs_full = sorted(a / b for a, b in zip(seconds, by_name["full"]))
        rows[name] = {**describe(models[name], x, flops0), "median_ms": statistics.median(ms), "p25_ms": q[0],
                      "p75_ms": q[2], "latency_share": statistics.median(vs_full),
                      "vs_torch_pruning": statistics.median(vs_tp), "vs_torch_pruning_p25": qt[0],
                      "vs_torch_pruning_p75": qt[2]}
    rows["torch_pruning"]["ratio"] = ratio
    rows["slimnet_flops"].update(target_flops=tp_flops, **flops_details)
    rows["slimnet_latency"].update(target_latency=tp_share, **latency_details)
    rows["slimnet_flops_at_latency"].update(target_flops=match_target, matched_share=match_share, probes=probes,
                                            **match_details)
    # the FLOPs policy's FLOPs at the latency policy's own measured share: between the probes that bracket it
    # (the timed probe is the one at or under it, slightly faster, so it understates the FLOPs policy)
    # (None when no two probes bracket it: a nearest probe at another latency is no comparison)
    at_share = interpolated_flops(probes, rows["slimnet_latency"]["latency_share"])
    targets = {
        "flops_policy_vs_torch_pruning_at_equal_flops": rows["slimnet_flops"]["vs_torch_pruning"],
        "latency_policy_flops_gain_at_equal_latency": (rows["slimnet_latency"]["flops_kept"] / at_share - 1
                                                       if at_share is not None else None),
        "flops_policy_flops_kept_at_that_latency": at_share,
        "interpolated": at_share is not None,
    }
    return {"model": cfg["model"], "input": [3, cfg["size"], cfg["size"]], "batch": batch, "threads": 1,
            "repeats": cfg["repeats"], "load_avg_1m_before": load, "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "seconds": time.perf_counter() - started, "models": rows, "targets": targets}


def table_cost_part(cfg: dict) -> dict:
    x = torch.zeros(1, 1, 28, 28)
    torch.manual_seed(0)
    model = create_model("vgg_small", num_classes=10, in_channels=1).eval()
    tables = {}
    for batch in cfg["table_batches"]:
        settings = LatencySettings(batch=batch, threads=1, cache_dir=tempfile.mkdtemp(prefix="slimnet-lt-"),
                                   **cfg["table_latency"])
        table = build_latency_table(model, x, settings)
        tables[f"b{batch}"] = {"seconds": table.seconds, "signatures": len(table.layers), "model_ms": table.model["ms"]}
    # one epoch of the default run: SGD steps of batch 128 in channels_last, torch's own thread count
    train = create_model("vgg_small", num_classes=10, in_channels=1).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(train.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.randn(cfg["epoch_batch"], 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (cfg["epoch_batch"],))
    step_seconds = []
    for i in range(cfg["epoch_steps"] + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(train(images), labels).backward()
        opt.step()
        if i >= 2:  # two warm-up steps
            step_seconds.append(time.perf_counter() - start)
    steps_per_epoch = math.ceil(55_000 / cfg["epoch_batch"])
    epoch = statistics.median(step_seconds) * steps_per_epoch
    return {"model": "vgg_small", "input": [1, 28, 28], "tables": tables, "epoch_seconds": epoch,
            "epoch": {"steps_timed": len(step_seconds), "batch": cfg["epoch_batch"], "steps_per_epoch": steps_per_epoch,
                      "threads": torch.get_num_threads(), "median_step_s": statistics.median(step_seconds)},
            "table_over_epoch": {k: v["seconds"] / epoch for k, v in tables.items()},
            "load_avg_1m": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------------------
# The JSON, parts and markdown
# --------------------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"study": "latency budget (issue 27)", "parts": {}}


def save(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, default=float)
    atomic_write(path, lambda f: f.write(text), binary=False)


def markdown(data: dict) -> str:
    lines = []
    for name, part in data["parts"].items():
        if name == "table_cost":
            lines += [f"### Table cost ({part['model']}, {part['env']['device']})", "",
                      "| table | seconds | signatures | one epoch (s) | table / epoch |", "|---|---|---|---|---|"]
            for key, t in part["tables"].items():
                lines.append(f"| {key} | {t['seconds']:.1f} | {t['signatures']} | {part['epoch_seconds']:.0f} | "
                             f"{part['table_over_epoch'][key]:.2f} |")
            lines.append("")
            continue
        lines += [(f"### {part['model']}, batch {part['batch']}, {part['threads']} thread ({part['env']['device']}, "
                   f"load {part['load_avg_1m_before']}→{part['load_avg_1m_after']}, {part['repeats']} rounds)"), "",
                  ("| model | FLOPs kept | params | median ms | p25–p75 ms | latency share "
                   "| vs Torch-Pruning (p25–p75) |"),
                  "|---|---|---|---|---|---|---|"]
        for model, r in part["models"].items():
            lines.append(f"| {model} | {r['flops_kept']:.3f} | {r['params'] / 1e6:.2f}M | {r['median_ms']:.1f} | "
                         f"{r['p25_ms']:.1f}–{r['p75_ms']:.1f} | {r['latency_share']:.3f} | "
                         f"{r['vs_torch_pruning']:.3f} "
                         f"({r['vs_torch_pruning_p25']:.3f}–{r['vs_torch_pruning_p75']:.3f}) |")
        t = part["targets"]
        lat = part["models"]["slimnet_latency"]
        measured = (lat.get("measured") or {}).get("fraction", float("nan"))
        lines += ["", (f"FLOPs policy / Torch-Pruning at equal FLOPs: "
                       f"{t['flops_policy_vs_torch_pruning_at_equal_flops']:.3f}× (target ≤ 1.0); "
                       + (f"latency policy keeps {t['latency_policy_flops_gain_at_equal_latency']:+.1%} FLOPs "
                          "against the FLOPs policy at equal latency "
                          f"({t['flops_policy_flops_kept_at_that_latency']:.3f} kept, interpolated"
                          if t["interpolated"] else
                          "no FLOPs-policy probes bracket the latency policy's measured share (no comparison at "
                          "equal latency") + "; target ≥ +10 %); latency "
                       f"policy: table {lat['table_seconds']:.0f} s, predicted {lat['predicted']['fraction']:.3f}, "
                       f"measured {measured:.3f}, rounding steps {lat['rounding_steps']}."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=None, help="resnet50_b1 resnet50_b16 table_cost (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=f"the JSON (default {OUT.relative_to(ROOT)}; "
                                                                "--smoke: a temporary file)")
    parser.add_argument("--force", action="store_true", help="measure the parts again even if the JSON has them")
    parser.add_argument("--smoke", action="store_true", help="resnet18 at 64x64, tiny settings: proves the script runs")
    parser.add_argument("--markdown", action="store_true", help="print the JSON's rows as markdown and exit")
    parser.add_argument("--cache-dir", default=None,
                        help="latency tables' cache (default: a fresh temporary directory)")
    args = parser.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-latency-budget-")) / "smoke.json" if args.smoke else OUT)
    data = load(out)
    if args.markdown:
        print(markdown(data))
        return
    cfg = study(args.smoke)
    names = [f"{cfg['model']}_b{b}" for b in cfg["batches"]] + ["table_cost"]
    parts = args.parts or names
    unknown = set(parts) - set(names)
    if unknown:
        sys.exit(f"error: unknown part(s) {sorted(unknown)}; choose from {names}")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="slimnet-latency-cache-")
    for name in parts:
        if name in data["parts"] and not args.force:
            print(f"{name}: already in {out} (--force measures it again)")
            continue
        print(f"{name} ...", flush=True)
        if name == "table_cost":
            part = table_cost_part(cfg)
        else:
            part = resnet_part(cfg, int(name.rsplit("_b", 1)[1]), cache_dir)
        part["env"] = env()
        part["command"] = " ".join(["python", "scripts/bench_latency_budget.py", *sys.argv[1:]])
        data["parts"][name] = part
        save(out, data)
        print(f"{name}: written to {out}", flush=True)
    print(markdown(data))


if __name__ == "__main__":
    main()
