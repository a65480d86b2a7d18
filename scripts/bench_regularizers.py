"""L1 against polarization against the λ controller against Torch-Pruning, at matched FLOPs, on the
default model and data.

    python scripts/bench_regularizers.py                      # seeds 0 1, full default recipe (hours here)
    python scripts/bench_regularizers.py --jobs 2 trainer.limit_train_batches=0.25   # a quarter of each epoch

Every pruned run cuts to the same FLOPs budget (``prune.target_flops``, default 0.3: ~70% removed), with
the same epochs and fine-tuning; only the sparse phase's regularizer differs. The unpruned run of the
same epochs is the reference. The Torch-Pruning rows take the L1 run's sparse checkpoint, cut it with
Torch-Pruning's slimming at the same budget and fine-tune it the same way (scripts/peer_torch_pruning.py):
only the cut differs from the L1 row. For each regularizer the sparse checkpoint is also cut at a range of
absolute thresholds (no fine-tuning) to show the threshold plateau: under polarization any threshold
between its two clusters should remove the same FLOPs. Writes docs/bench_regularizers.{json,md} (rows of
an earlier invocation with the same overrides are kept, so ``--runs controller`` adds to a study) and
docs/gamma_l1_vs_polarization.png (seed 0's |γ| at the cut).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_default import host_images_per_second  # noqa: E402

RUNS = {  # run name -> overrides of the slimnet run (the Torch-Pruning rows are peer runs on L1's sparse model)
    "l1": [],
    "tp_mean": None,  # Torch-Pruning's default importance: each group's |γ| over its mean
    "tp_raw": None,   # Torch-Pruning with raw |γ| ranked globally (normalizer=None), as Liu et al.
    "polarization": ["sparsity.kind=polarization"],
    "unpruned": ["experiment=baseline"],
    # The λ controller aims at the share of channels the budget removes (41-43% at −70% FLOPs under L1 and
    # polarization, measured at a quarter scale), so its zeros are the channels the cut takes.
    "controller": ["sparsity.target=0.45"],
    "polarization_target": ["sparsity.kind=polarization", "sparsity.target=0.45"],
}
THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.3)
JSON, MD, FIGURE = (ROOT / "docs" / n for n in ("bench_regularizers.json", "bench_regularizers.md",
                                                  "gamma_l1_vs_polarization.png"))


def run(name: str, overrides: list[str], seed: int, budget: float, out: Path, threads: int | None) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    if RUNS[name] is None:  # a Torch-Pruning row: the peer cuts the L1 run's sparse model
        cmd = [sys.executable, str(ROOT / "scripts" / "peer_torch_pruning.py"), str(out / f"l1-seed{seed}"),
               str(run_dir), "--normalizer", name.removeprefix("tp_").replace("raw", "none")]
    else:
        policy = [] if name == "unpruned" else [f"prune.target_flops={budget}"]
        cmd = [sys.executable, "-m", "slimnet.train", *RUNS[name], *overrides, *policy, f"seed={seed}",
               f"hydra.run.dir={run_dir}", "callbacks.progress_bar=false", "prune.reuse_sparse=false",
               "latency.enabled=false"]
    with open(out / f"{name}-seed{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    r = json.loads((run_dir / "results.json").read_text())
    row = {"run": name, "seed": seed, "test_acc": r["test_acc"], "val_acc_after_cut": r.get("val_acc_after_cut"),
           "flops_reduction": r["flops_reduction"], "threshold": r["threshold"], "fit_seconds": r["seconds"]["fit"],
           "channels": {k: v[1] for k, v in r["channels"].items()}}
    sparse = run_dir / "checkpoints" / "sparse.ckpt"
    if RUNS[name] is not None and sparse.is_file():
        row["plateau"], row["gammas"] = plateau(sparse)
    return row


def plateau(checkpoint: Path) -> tuple[dict[str, float], list[float]]:
    """The share of FLOPs each absolute |γ| threshold removes from a sparse checkpoint (no fine-tuning),
    and every |γ| of the sparse model (for the histogram)."""
    import slimnet
    from slimnet.tasks.classification.module import SlimModule

    module = SlimModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    model, x = module.model, torch.zeros(1, module.hparams.model_config["in_channels"], 28, 28)
    out = {str(t): slimnet.prune(copy.deepcopy(model), x, thresh=t, min_channels=4).flops_reduction for t in THRESHOLDS}
    gammas = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])
    return out, [round(float(g), 5) for g in gammas]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=float, default=0.3, help="prune.target_flops of every pruned run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side, one thread each when > 1")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_regularizers")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to every run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "host_train_images_per_second": host_images_per_second(),
           "overrides": args.overrides, "budget": args.budget, "jobs": args.jobs}
    rows = earlier_rows(args)
    lock = threading.Lock()

    def one_seed(seed: int) -> None:
        for name in args.runs:  # the report is rewritten after every run: a stopped study keeps what it measured
            row = run(name, args.overrides, seed, args.budget, args.out, threads=1 if args.jobs > 1 else None)
            with lock:
                rows[:] = [r for r in rows if (r["run"], r["seed"]) != (name, seed)] + [row]
                write_report(rows, env, args)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one_seed, seed) for seed in args.seeds]:
            future.result()
    print(MD.read_text())


def earlier_rows(args) -> list[dict]:
    """Rows of an earlier invocation with the same overrides and budget: a study may be run in parts."""
    if not JSON.is_file():
        return []
    earlier = json.loads(JSON.read_text())
    same = earlier["env"].get("overrides") == args.overrides and earlier["env"].get("budget") == args.budget
    return earlier["rows"] if same else []


def write_report(rows: list[dict], env: dict, args) -> None:
    order = list(RUNS)
    rows.sort(key=lambda r: (r["seed"], order.index(r["run"])))
    JSON.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = ["| run | seed | test acc | FLOPs removed | val acc right after cut | "
             + " | ".join(f"thresh {t}" for t in THRESHOLDS) + " |", "|---" * (5 + len(THRESHOLDS)) + "|"]
    for r in rows:
        cut = f"{100 * r['val_acc_after_cut']:.2f}%" if r.get("val_acc_after_cut") is not None else "—"
        steps = " | ".join(f"−{100 * v:.0f}%" for v in r.get("plateau", {}).values()) or " | ".join("—" * len(THRESHOLDS))
        lines.append(f"| {r['run']} | {r['seed']} | {100 * r['test_acc']:.2f}% | −{100 * r['flops_reduction']:.1f}% | "
                     f"{cut} | {steps} |")
    lines += ["", "| run | seeds | mean test acc | mean FLOPs removed |", "|---|---|---|---|"]
    for name in order:
        mine = [r for r in rows if r["run"] == name]
        if mine:
            lines.append(f"| {name} | {len(mine)} | {100 * statistics.mean(r['test_acc'] for r in mine):.2f}% | "
                         f"−{100 * statistics.mean(r['flops_reduction'] for r in mine):.1f}% |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"\nOverrides: {' '.join(args.overrides) or 'none'}; budget prune.target_flops={args.budget}; "
                 f"host bare training step {env['host_train_images_per_second']:.0f} img/s. "
                 f"Command: python scripts/bench_regularizers.py --seeds {' '.join(map(str, seeds))} "
                 f"--jobs {args.jobs} {' '.join(args.overrides)}")
    MD.write_text("\n".join(lines) + "\n")
    gamma_figure(rows)


def gamma_figure(rows: list[dict]) -> None:
    """|γ| at the cut under L1 and under polarization (seed 0, or the first seed measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("l1", "polarization") if any(r["run"] == k and r.get("gammas") for r in rows)]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.0), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        row = min((r for r in rows if r["run"] == kind and r.get("gammas")), key=lambda r: r["seed"])
        ax.hist(row["gammas"], bins=60, range=(0, max(max(row["gammas"]), 0.6)), color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"{kind} (seed {row['seed']}): |γ| at the cut")
        ax.set_xlabel("|γ|")
        for t in (0.05, 0.3):
            ax.axvline(t, color="grey", lw=0.8, ls="--")
    axes[0][0].set_ylabel("BN channels (log)")
    fig.text(0.5, -0.02, "dashed: thresholds 0.05 and 0.3 (the plateau range)", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
