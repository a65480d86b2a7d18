"""Issue 26's study: distillation from the uncut model, polarization cut at its valleys, Torch-Pruning on
the same sparse model with the same fine-tune (± distillation), and the found architectures trained from
scratch — on the default model and data, same total epochs for every row.

    python scripts/bench_distill.py --seeds 0 1 2 --jobs 2 trainer.limit_train_batches=0.5   # hours: run in parts
    python scripts/bench_distill.py --cost                                                    # the teacher's cost

Rows (per seed): ``unpruned`` (experiment=baseline); ``l1`` and ``l1_distill`` (L1 sparse phase, cut to
``prune.target_flops``); ``pol_valley`` and ``pol_valley_distill`` (polarization, ``prune.thresh=auto``:
each layer at its own valley); ``pol_70`` (polarization at the same FLOPs budget as L1); ``tp_raw`` /
``tp_mean`` (Torch-Pruning's slimming, raw |γ| / its default mean-normalised importance, on L1's sparse
model, fine-tuned as L1 is: scripts/peer_torch_pruning.py) and their ``_distill`` rows; ``scratch_l1``
and ``scratch_pol_valley`` (the architecture each of those cuts found, trained from scratch without
sparsity for the same total epochs: Liu et al., ICLR 2019). Rows that share a sparse phase train it once
(the run's own sparse cache). Rows are kept in docs/bench_distill.json: a stopped study goes on where it
stopped with the same command; docs/bench_distill.md is rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_default import host_images_per_second  # noqa: E402

JSON, MD = ROOT / "docs" / "bench_distill.json", ROOT / "docs" / "bench_distill.md"
DISTIL = ["finetune.distill=true"]
POLARIZATION = ["sparsity.kind=polarization"]
RUNS = {  # name -> overrides of a slimnet run ({budget} filled in); None: a peer or from-scratch row
    "unpruned": ["experiment=baseline"],
    "l1": ["prune.target_flops={budget}"],
    # slimnet's cut without folding the removed channels' β: the cut Torch-Pruning makes with raw |γ|
    "l1_nofold": ["prune.target_flops={budget}", "prune.fold_bias=false"],
    "l1_distill": ["prune.target_flops={budget}", *DISTIL],
    # the soft term's weight: 0.9 (Tian et al.'s default) kept the student at its teacher's level, below plain
    # fine-tuning (docs/distillation.md), so lighter weights are rows of their own
    "l1_distill_w0.5": ["prune.target_flops={budget}", *DISTIL, "finetune.distill_weight=0.5"],
    "l1_distill_w0.3": ["prune.target_flops={budget}", *DISTIL, "finetune.distill_weight=0.3"],
    "pol_valley": [*POLARIZATION, "prune.thresh=auto"],
    "pol_valley_distill": [*POLARIZATION, "prune.thresh=auto", *DISTIL],
    "pol_70": [*POLARIZATION, "prune.target_flops={budget}"],
    "tp_raw": None, "tp_mean": None, "tp_raw_distill": None, "tp_mean_distill": None,
    "scratch_l1": None, "scratch_pol_valley": None,
}
PAIRED = (("l1", "tp_mean"), ("l1", "tp_raw"), ("l1_nofold", "tp_mean"), ("l1_nofold", "l1"), ("pol_70", "tp_mean"), ("l1_distill_w0.5", "l1"),
          ("l1_distill_w0.3", "l1"), ("tp_mean_distill", "tp_mean"), ("pol_valley_distill", "pol_valley"),
          ("scratch_l1", "l1"), ("scratch_pol_valley", "pol_valley"))
THRESHOLDS = (0.05, 0.1, 0.2, 0.3)  # the valley-cut claim: under polarization these remove the same FLOPs


def commit() -> str:
    """The code a row was measured with (rows of one study can span commits: a stopped study goes on)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "slimnet"], cwd=ROOT, capture_output=True, text=True,
                           check=False)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def found_cfg(run_dir: Path) -> list:
    """The VGG cfg (widths and 'M') of the cut model a run saved in pruned.pt."""
    import slimnet

    model = slimnet.load_pruned(run_dir / "pruned.pt")
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else "M" for m in model.features
            if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))]


def command(name: str, seed: int, budget: float, out: Path, overrides: list[str]) -> list[str]:
    run_dir = out / f"{name}-seed{seed}"
    if name.startswith("tp_"):
        normalizer = "none" if name.startswith("tp_raw") else "mean"
        return [sys.executable, str(ROOT / "scripts" / "peer_torch_pruning.py"), str(out / f"l1-seed{seed}"),
                str(run_dir), "--normalizer", normalizer, *(["--distill"] if name.endswith("_distill") else [])]
    common = [f"seed={seed}", f"hydra.run.dir={run_dir}", "callbacks.progress_bar=false", "latency.enabled=false",
              "prune.reuse_sparse=true", f"prune.cache_dir={out / 'sparse_cache'}", *overrides]
    if name.startswith("scratch_"):
        cfg = found_cfg(out / f"{name.removeprefix('scratch_')}-seed{seed}")
        return [sys.executable, "-m", "slimnet.train", "experiment=baseline", "model=vgg",
                f"model.cfg=[{','.join(map(str, cfg))}]", *common]
    return [sys.executable, "-m", "slimnet.train", *(o.format(budget=budget) for o in RUNS[name]), *common]


def run(name: str, seed: int, budget: float, out: Path, overrides: list[str], threads: int | None) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    with open(out / f"{name}-seed{seed}.log", "w") as log:
        subprocess.run(command(name, seed, budget, out, overrides), cwd=ROOT, check=True, stdout=log,
                       stderr=subprocess.STDOUT, env=env)
    r = json.loads((run_dir / "results.json").read_text())
    row = {"run": name, "seed": seed, "test_acc": r["test_acc"], "val_acc_after_cut": r.get("val_acc_after_cut"),
           "flops": r["after"]["flops"], "flops_reduction": r["flops_reduction"],
           "wall_seconds": time.perf_counter() - start, "fit_seconds": r["seconds"]["fit"],
           "sparse_reused": (r.get("sparse_phase") or {}).get("reused"), "warnings": r.get("warnings", []),
           "commit": commit()}
    if (run_dir / "pruned.pt").is_file() and not name.startswith("tp_"):
        row["cfg"] = found_cfg(run_dir)
    if name == "pol_valley" and (sparse := sparse_checkpoint(out, name, seed)) is not None:
        row["plateau"] = plateau(sparse)
    return row


def sparse_checkpoint(out: Path, name: str, seed: int) -> Path | None:
    """The sparse model a row was cut from: its own, or the shared sparse phase's it reused."""
    run_dir = out / f"{name}-seed{seed}"
    own = run_dir / "checkpoints" / "sparse.ckpt"
    if own.is_file():
        return own
    results = run_dir / "results.json"
    key = (json.loads(results.read_text()).get("sparse_phase") or {}).get("key") if results.is_file() else None
    shared = out / "sparse_cache" / str(key) / "sparse.ckpt"
    return shared if key and shared.is_file() else None


def plateau(checkpoint: Path) -> dict[str, float]:
    """FLOPs removed from a sparse checkpoint at each absolute threshold and at ``auto`` (no fine-tuning)."""
    import warnings

    import slimnet
    from slimnet.tasks.classification.module import SlimModule

    module = SlimModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    model, x = module.model, torch.zeros(1, module.hparams.model_config["in_channels"], 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {str(t): slimnet.prune(copy.deepcopy(model), x, thresh=t, min_channels=4).flops_reduction
                for t in (*THRESHOLDS, "auto")}


def teacher_cost(repeats: int = 30) -> dict:
    """Memory of the teacher and the time a fine-tune step takes with and without its forward
    (default model, batch 128, interleaved repeats on this host)."""
    import slimnet
    from slimnet.core.distill import Distillation
    from slimnet.models import create_model

    torch.manual_seed(0)
    teacher = create_model("vgg_small", num_classes=10, in_channels=1)
    student = copy.deepcopy(teacher)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    slimnet.prune(student, x[:1], percent=0.5)
    distil = Distillation()
    distil.take(teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(with_teacher: bool) -> float:
        t0 = time.perf_counter()
        logits = student(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if with_teacher:
            loss = distil.loss(logits, x, loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(3):
        step(True), step(False)
    plain, taught = [], []
    for _ in range(repeats):  # ABAB: drift of a shared host falls on both
        plain.append(step(False))
        taught.append(step(True))
    return {"teacher_mb": distil.teacher_bytes() / 1e6, "student_step_ms": 1e3 * statistics.median(plain),
            "distilled_step_ms": 1e3 * statistics.median(taught),
            "step_ratio": statistics.median(taught) / statistics.median(plain), "threads": torch.get_num_threads(),
            "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=0.3, help="prune.target_flops of the budget rows")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side, one thread each when > 1")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_distill")
    parser.add_argument("--cost", action="store_true", help="only measure the teacher's memory and step time")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to every slimnet run")
    args = parser.parse_args()
    data = json.loads(JSON.read_text()) if JSON.is_file() else {"env": {}, "rows": []}
    if args.cost:
        data["cost"] = teacher_cost()
        JSON.write_text(json.dumps(data, indent=1) + "\n")
        write_report(data)
        print(json.dumps(data["cost"], indent=1))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "overrides": args.overrides, "budget": args.budget, "jobs": args.jobs}
    if data["env"] and (data["env"].get("overrides"), data["env"].get("budget")) != (args.overrides, args.budget):
        sys.exit(f"error: {JSON} holds rows of other settings ({data['env']}); move it away to start a new study")
    env["host_train_images_per_second"] = data["env"].get("host_train_images_per_second") or host_images_per_second()
    data["env"] = env
    done = {(r["run"], r["seed"]) for r in data["rows"]}
    for row in data["rows"]:  # rows whose sparse model was a shared one: their plateau, measured now
        if row["run"] == "pol_valley" and "plateau" not in row and (
                sparse := sparse_checkpoint(args.out, row["run"], row["seed"])) is not None:
            row["plateau"] = plateau(sparse)
    lock = threading.Lock()

    def one_seed(seed: int) -> None:
        for name in args.runs:
            if (name, seed) in done:
                continue
            row = run(name, seed, args.budget, args.out, args.overrides, threads=1 if args.jobs > 1 else None)
            with lock:  # the report is rewritten after every row: a stopped study keeps what it measured
                data["rows"] = [r for r in data["rows"] if (r["run"], r["seed"]) != (name, seed)] + [row]
                JSON.write_text(json.dumps(data, indent=1) + "\n")
                write_report(data)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one_seed, seed) for seed in args.seeds]:
            future.result()
    JSON.write_text(json.dumps(data, indent=1) + "\n")  # plateaus measured above, rows adopted by hand
    write_report(data)
    print(MD.read_text())


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}%"


def write_report(data: dict) -> None:
    rows, env, order = data["rows"], data["env"], list(RUNS)
    rows.sort(key=lambda r: (r["seed"], order.index(r["run"])))
    lines = ["# Distillation, the valley cut, Torch-Pruning and training from scratch", "",
             "| run | seeds | test acc (mean ± sd) | FLOPs removed | val acc right after cut | wall s / row |",
             "|---|---|---|---|---|---|"]
    means = {}
    for name in order:
        mine = [r for r in rows if r["run"] == name]
        if not mine:
            continue
        means[name] = statistics.mean(r["test_acc"] for r in mine), [r["test_acc"] for r in mine]
        cut = [r["val_acc_after_cut"] for r in mine if r.get("val_acc_after_cut") is not None]
        lines.append(f"| {name} | {len(mine)} | {_mean_sd([r['test_acc'] for r in mine])} | "
                     f"−{100 * statistics.mean(r['flops_reduction'] for r in mine):.1f}% | "
                     f"{_mean_sd(cut) if cut else '—'} | {statistics.mean(r['wall_seconds'] for r in mine):.0f} |")
    if not means:
        lines = lines[:2] + ["No study rows yet: python scripts/bench_distill.py --seeds 0 1 2 --jobs 2 "
                             "trainer.limit_train_batches=0.5"]
    else:
        lines += ["", "| run | seed | test acc | FLOPs removed | val acc after cut | architecture | code |",
                  "|---|---|---|---|---|---|---|"]
    for r in rows:
        cut = f"{100 * r['val_acc_after_cut']:.2f}%" if r.get("val_acc_after_cut") is not None else "—"
        lines.append(f"| {r['run']} | {r['seed']} | {100 * r['test_acc']:.2f}% | −{100 * r['flops_reduction']:.1f}% | "
                     f"{cut} | {' '.join(map(str, r.get('cfg') or [])) or '—'} | {r.get('commit', '—')} |")
    plateaus = [r for r in rows if r.get("plateau")]
    if plateaus:
        lines += ["", "FLOPs removed from polarization's sparse model (no fine-tuning) by threshold:", "",
                  "| seed | " + " | ".join(plateaus[0]["plateau"]) + " |", "|---" * (1 + len(plateaus[0]["plateau"])) + "|"]
        lines += [f"| {r['seed']} | " + " | ".join(f"−{100 * v:.0f}%" for v in r["plateau"].values()) + " |"
                  for r in plateaus]
    if "cost" in data:
        c = data["cost"]
        lines += ["", f"Teacher cost (default model, batch 128, {c['threads']} threads, median of {c['repeats']} "
                  f"interleaved steps): {c['teacher_mb']:.2f} MB of parameters and buffers; a fine-tune step of the "
                  f"50 %-cut student {c['student_step_ms']:.1f} ms, with the teacher's forward "
                  f"{c['distilled_step_ms']:.1f} ms (×{c['step_ratio']:.2f}). Command: python scripts/bench_distill.py --cost"]
    if means:
        lines += ["", "Differences of means (pp): "
                  + "; ".join(f"{a} − {b} = {100 * (means[a][0] - means[b][0]):+.2f}"
                              for a, b in (("l1_distill", "l1"), ("l1_distill_w0.5", "l1"), ("l1_distill_w0.3", "l1"),
                                           ("pol_valley_distill", "pol_valley"),
                                           ("l1", "tp_mean"), ("l1_distill", "tp_mean"), ("tp_raw_distill", "tp_raw"),
                                           ("l1", "scratch_l1"), ("pol_valley", "scratch_pol_valley"))
                              if a in means and b in means)]
    by = {(r["run"], r["seed"]): r["test_acc"] for r in rows}
    paired = []
    for a, b in PAIRED:  # the same seed's sparse model on both sides: the spread of the differences is the test
        diffs = [100 * (by[(a, s)] - by[(b, s)]) for s in sorted({s for _, s in by}) if (a, s) in by and (b, s) in by]
        if diffs:
            sd = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
            paired.append(f"{a} − {b} = {statistics.mean(diffs):+.2f}{sd} over {len(diffs)} seed(s) "
                          f"({', '.join(f'{d:+.2f}' for d in diffs)})")
    if paired:
        lines += ["", "Paired by seed (pp, mean ± sd of the per-seed differences): " + "; ".join(paired)]
    if env:
        seeds = sorted({r["seed"] for r in rows})
        lines.append(f"\nOverrides: {' '.join(env['overrides']) or 'none'}; budget prune.target_flops={env['budget']}; "
                     f"host bare training step {env['host_train_images_per_second']:.0f} img/s. Command: python "
                     f"scripts/bench_distill.py --seeds {' '.join(map(str, seeds))} --jobs {env['jobs']} "
                     f"{' '.join(env['overrides'])}")
    MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
