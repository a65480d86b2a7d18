"""Issue 27 on the default model: accuracy against measured latency, ``prune.target_latency`` against
``prune.target_flops`` at the same budgets and epochs, two seeds.

    python scripts/bench_latency_vs_flops.py trainer.limit_train_batches=0.5     # table, runs, timing, report
    python scripts/bench_latency_vs_flops.py --report                            # the markdown and picture only

Steps, each kept in docs/bench_latency_vs_flops.json as it ends (a stopped study goes on where it stopped with
the same command; other settings are refused):

1. **table**: the default model's latency table (batch 1, one thread: ``prune.latency``'s defaults) is
   measured once on quiet cores into the study's cache, and its cost kept; every latency run then reads it
   from the cache (each row records its table's ``source``), so no run times anything while the other
   trains beside it.
2. **runs**: per seed (the seeds side by side, one thread each) one sparse phase, shared through the sparse
   cache, then one fine-tune per policy and budget: ``prune.target_latency=B`` and ``prune.target_flops=B``
   for B in ``--budgets``. ``latency.enabled=false``: the runs' own timing would be taken under load.
3. **timing**: when every run is done, alone: each cut model and the uncut architecture timed interleaved
   (ABBA, batch 1 and 16, one thread); a row's latency share is the median over rounds of its time over
   the uncut model's in the same round.
4. **report**: docs/bench_latency_vs_flops.md and .png — test accuracy against measured latency share per
   policy, and, at each latency-policy point, the FLOPs policy's accuracy interpolated at the same measured
   latency on the same seed (the issue's target: the latency policy at or above the FLOPs policy at every
   latency).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's slimnet, as its runs (python -m slimnet.train, cwd=ROOT) use
JSON, MD, PNG = (ROOT / "docs" / f"bench_latency_vs_flops.{ext}" for ext in ("json", "md", "png"))
POLICIES = {"latency": "prune.target_latency", "flops": "prune.target_flops"}
BATCHES = (1, 16)
REPEATS = 40


def table_step(out: Path) -> dict:
    """Measure the default model's latency table into the study's cache (what the runs will read)."""
    import slimnet
    from slimnet.engine.latency_table import LatencySettings
    from slimnet.models import create_model

    model = create_model("vgg_small", num_classes=10, in_channels=1)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = slimnet.prune(model, torch.zeros(1, 1, 28, 28), target_latency=0.5,
                               latency_settings=LatencySettings(cache_dir=str(out / "latency_cache")))
    table = report.details["latency"]
    return {"seconds": time.perf_counter() - start, "source": table.get("table", {}).get("source"),
            "build_seconds": table.get("table", {}).get("seconds")}


def run_name(policy: str, budget: float, seed: int) -> str:
    return f"{policy}{budget:g}-seed{seed}"


def train_one(policy: str, budget: float, seed: int, out: Path, overrides: list[str], threads: int | None) -> dict:
    run_dir = out / run_name(policy, budget, seed)
    cmd = [sys.executable, "-m", "slimnet.train", f"{POLICIES[policy]}={budget}", f"seed={seed}",
           f"hydra.run.dir={run_dir}", "callbacks.progress_bar=false", "latency.enabled=false",
           "prune.reuse_sparse=true", f"prune.cache_dir={out / 'sparse_cache'}",
           f"prune.latency.cache_dir={out / 'latency_cache'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    with open(out / f"{run_name(policy, budget, seed)}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    r = json.loads((run_dir / "results.json").read_text())
    cut = r.get("latency_cut") or {}
    return {"policy": policy, "budget": budget, "seed": seed, "test_acc": r["test_acc"],
            "val_acc_after_cut": r.get("val_acc_after_cut"), "flops": r["after"]["flops"],
            "flops_before": r["before"]["flops"], "params": r["after"]["params"],
            "predicted_share": (cut.get("predicted") or {}).get("fraction"),
            "table_source": (cut.get("table") or {}).get("source"),
            "sparse_reused": (r.get("sparse_phase") or {}).get("reused"),
            "wall_seconds": time.perf_counter() - start, "fit_seconds": r["seconds"]["fit"]}


def timing_step(rows: list[dict], out: Path) -> dict:
    """Every cut model and the uncut architecture, timed interleaved, alone (see the module docstring)."""
    import slimnet
    from slimnet.engine.latency_table import LatencySettings, time_models
    from slimnet.models import create_model

    models = [create_model("vgg_small", num_classes=10, in_channels=1)] + [
        slimnet.load_pruned(out / run_name(r["policy"], r["budget"], r["seed"]) / "pruned.pt") for r in rows]
    result = {"load_before": os.getloadavg()[0]}
    for batch in BATCHES:
        seconds = time_models(models, torch.zeros(1, 1, 28, 28), LatencySettings(batch=batch), repeats=REPEATS)
        full = seconds[0]
        result[f"b{batch}"] = {"full_ms": 1e3 * statistics.median(full), "shares": [
            statistics.median(t / f for t, f in zip(s, full)) for s in seconds[1:]],
            "ms": [1e3 * statistics.median(s) for s in seconds[1:]]}
    result["load_after"] = os.getloadavg()[0]
    return result


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x over (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def report(data: dict) -> str:
    rows, timing = data["rows"], data.get("timing")
    lines = ["# Accuracy against measured latency: target_latency vs target_flops (issue 27)", "",
             "Command: `python scripts/bench_latency_vs_flops.py " + " ".join(data["env"]["overrides"]) + "` "
             f"(torch {data['env']['torch']}; default model and data, seeds "
             f"{sorted({r['seed'] for r in rows})}, the same epochs for every row; latency measured after all "
             f"runs, alone, interleaved, one thread, {REPEATS} rounds).", ""]
    if "table" in data:
        t = data["table"]
        sources = sorted({r["table_source"] for r in rows if r["policy"] == "latency"})
        lines += [(f"Latency table (batch 1, one thread): built in {t['seconds']:.1f} s; the latency runs' table "
                   f"source: {sources}."), ""]
    if not timing or len(timing["b1"]["shares"]) != len(rows):
        lines += ["Timing not done yet: rows so far", ""] + [
            f"- {r['policy']} {r['budget']:g} seed {r['seed']}: {100 * r['test_acc']:.2f}%, FLOPs "
            f"{r['flops'] / r['flops_before']:.3f}" for r in rows]
        return "\n".join(lines) + "\n"
    for batch in BATCHES:
        t = timing[f"b{batch}"]
        lines += [f"## Batch {batch} (uncut {t['full_ms']:.3f} ms)", "",
                  "| policy | budget | seed | test acc | FLOPs kept | predicted latency | measured latency (share) |",
                  "|---|---|---|---|---|---|---|"]
        for r, share, ms in zip(rows, t["shares"], t["ms"]):
            pred = f"{r['predicted_share']:.3f}" if r.get("predicted_share") is not None else "—"
            lines.append(f"| {r['policy']} | {r['budget']:g} | {r['seed']} | {100 * r['test_acc']:.2f}% | "
                         f"{r['flops'] / r['flops_before']:.3f} | {pred} | {ms:.3f} ms ({share:.3f}) |")
        lines += ["", ("At each latency-policy point, the FLOPs policy's accuracy at the same measured latency "
                       "(interpolated on the same seed):"), ""]
        for r, share in zip(rows, t["shares"]):
            if r["policy"] != "latency":
                continue
            peers = [(s, q["test_acc"]) for q, s in zip(rows, t["shares"])
                     if q["policy"] == "flops" and q["seed"] == r["seed"]]
            other = interpolate(peers, share)
            lines.append(f"- budget {r['budget']:g}, seed {r['seed']}: latency policy {100 * r['test_acc']:.2f}% at "
                         f"{share:.3f}; FLOPs policy " + (f"{100 * other:.2f}% → {100 * (r['test_acc'] - other):+.2f} pp"
                                                         if other is not None else "outside its measured range"))
        lines.append("")
    lines += [f"![accuracy vs measured latency]({PNG.name})", ""]
    return "\n".join(lines) + "\n"


def draw(data: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, timing = data["rows"], data["timing"]
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4))
    for ax, batch in zip(axes, BATCHES):
        shares = timing[f"b{batch}"]["shares"]
        for policy, marker in (("latency", "o"), ("flops", "s")):
            for seed in sorted({r["seed"] for r in rows}):
                pts = sorted((s, 100 * r["test_acc"]) for r, s in zip(rows, shares)
                             if r["policy"] == policy and r["seed"] == seed)
                ax.plot(*zip(*pts), marker=marker, label=f"target_{policy} seed {seed}")
        ax.set_xlabel(f"measured latency share (batch {batch}, 1 thread)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def save(data: dict) -> None:
    JSON.write_text(json.dumps(data, indent=1) + "\n")
    MD.write_text(report(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="both policies'")
    parser.add_argument("--flops-budgets", type=float, nargs="*", default=[0.2, 0.25, 0.75],
                        help="the FLOPs policy's besides: its latency at a budget is lower than the latency "
                             "policy's, so these widen its range to bracket every latency-policy point")
    parser.add_argument("--jobs", type=int, default=2, help="seeds trained side by side, one thread each when > 1")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_latency_vs_flops")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown and the picture")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to every run")
    args = parser.parse_args()
    data = json.loads(JSON.read_text()) if JSON.is_file() else {"env": {}, "rows": []}
    if args.report:
        save(data)
        if data.get("timing"):
            draw(data)
        print(MD.read_text())
        return
    env = {"torch": torch.__version__, "overrides": args.overrides, "budgets": args.budgets,
           "flops_budgets": args.flops_budgets, "seeds": args.seeds}
    if data["env"] and {k: data["env"].get(k) for k in env} != env:
        sys.exit(f"error: {JSON} holds rows of other settings ({data['env']}); move it away to start a new study")
    data["env"] = env
    args.out.mkdir(parents=True, exist_ok=True)
    if "table" not in data:
        data["table"] = table_step(args.out)
        save(data)
        print("table:", data["table"])
    done = {(r["policy"], r["budget"], r["seed"]) for r in data["rows"]}
    todo = [(p, b) for b in args.budgets for p in POLICIES] + [("flops", b) for b in args.flops_budgets]

    def one_seed(seed: int) -> None:
        for policy, budget in todo:
            if (policy, budget, seed) in done:
                continue
            row = train_one(policy, budget, seed, args.out, args.overrides, 1 if args.jobs > 1 else None)
            data["rows"] = [*data["rows"], row]  # one writer per seed; the list is rebuilt atomically
            save(data)
            print(f"{run_name(policy, budget, seed)}: {100 * row['test_acc']:.2f}%", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one_seed, s) for s in args.seeds]:
            future.result()
    data["rows"].sort(key=lambda r: (r["seed"], r["policy"], r["budget"]))
    if not data.get("timing") or len(data["timing"]["b1"]["shares"]) != len(data["rows"]):
        data["timing"] = timing_step(data["rows"], args.out)
    save(data)
    draw(data)
    print(MD.read_text())


if __name__ == "__main__":
    main()
