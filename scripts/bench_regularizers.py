"""L1 against polarization against the λ controller, at matched FLOPs, on the default model and data.

    python scripts/bench_regularizers.py                      # seeds 0 1, full default recipe (hours here)
    python scripts/bench_regularizers.py --seeds 0 trainer.limit_train_batches=0.2   # a scaled-down study

Every pruned run cuts to the same FLOPs budget (``prune.target_flops``, default 0.3: ~70% removed), with
the same epochs and fine-tuning; only the sparse phase's regularizer differs. The unpruned run of the
same epochs is the reference. For each regularizer the sparse checkpoint is also cut at a range of
absolute thresholds (no fine-tuning) to show the threshold plateau: under polarization any threshold
between its two clusters should remove the same FLOPs. Writes docs/bench_regularizers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_default import host_images_per_second  # noqa: E402

RUNS = {
    "l1": [],
    "polarization": ["sparsity.kind=polarization"],
    "controller": ["sparsity.target=0.6"],
    "unpruned": ["experiment=baseline"],
}
THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.3)


def run(name: str, overrides: list[str], seed: int, budget: float, out: Path) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    policy = [] if name == "unpruned" else [f"prune.target_flops={budget}"]
    cmd = [sys.executable, "-m", "slimnet.train", *overrides, *policy, f"seed={seed}", f"hydra.run.dir={run_dir}",
           "callbacks.progress_bar=false", "prune.reuse_sparse=false", "latency.enabled=false"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads((run_dir / "results.json").read_text())
    row = {"run": name, "seed": seed, "test_acc": r["test_acc"], "val_acc_after_cut": r.get("val_acc_after_cut"),
           "flops_reduction": r["flops_reduction"], "threshold": r["threshold"]}
    sparse = run_dir / "checkpoints" / "sparse.ckpt"
    if sparse.is_file():
        row["plateau"] = plateau(sparse)
    return row


def plateau(checkpoint: Path) -> dict[str, float]:
    """The share of FLOPs each absolute |γ| threshold removes from a sparse checkpoint (no fine-tuning)."""
    import slimnet
    from slimnet.module import SlimModule

    out = {}
    for thresh in THRESHOLDS:
        module = SlimModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        x = torch.zeros(1, module.hparams.model_config["in_channels"], 28, 28)
        out[str(thresh)] = slimnet.prune(module.model, x, thresh=thresh, min_channels=4).flops_reduction
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=float, default=0.3, help="prune.target_flops of every pruned run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_regularizers")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to every run")
    args = parser.parse_args()
    env = {"torch": torch.__version__, "host_train_images_per_second": host_images_per_second(),
           "overrides": args.overrides, "budget": args.budget}
    rows = []
    for seed in args.seeds:
        for name in args.runs:  # the report is rewritten after every run: a stopped study keeps what it measured
            rows.append(run(name, [*RUNS[name], *args.overrides], seed, args.budget, args.out))
            table = write_report(rows, env, args)
    print(table)


def write_report(rows: list[dict], env: dict, args) -> str:
    (ROOT / "docs" / "bench_regularizers.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    lines = ["| regularizer | seed | test acc | FLOPs removed | val acc right after cut | "
             + " | ".join(f"thresh {t}" for t in THRESHOLDS) + " |", "|---" * (5 + len(THRESHOLDS)) + "|"]
    for r in rows:
        cut = f"{100 * r['val_acc_after_cut']:.2f}%" if r.get("val_acc_after_cut") is not None else "—"
        steps = " | ".join(f"−{100 * v:.0f}%" for v in r.get("plateau", {}).values()) or " | ".join("—" * len(THRESHOLDS))
        lines.append(f"| {r['run']} | {r['seed']} | {100 * r['test_acc']:.2f}% | −{100 * r['flops_reduction']:.1f}% | "
                     f"{cut} | {steps} |")
    for name in args.runs:
        accs = [r["test_acc"] for r in rows if r["run"] == name]
        if accs:
            lines.append(f"\n{name}: mean test acc {100 * statistics.mean(accs):.2f}% over {len(accs)} seed(s)")
    lines.append(f"\nOverrides: {' '.join(args.overrides) or 'none'}; budget prune.target_flops={args.budget}; "
                 f"host bare training step {env['host_train_images_per_second']:.0f} img/s. "
                 f"Command: python scripts/bench_regularizers.py --seeds {' '.join(map(str, args.seeds))} "
                 f"{' '.join(args.overrides)}")
    table = "\n".join(lines)
    (ROOT / "docs" / "bench_regularizers.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
