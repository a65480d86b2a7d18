"""λ under AdamW, measured: does a λ from docs/sparsity.md separate γ, and does ``sparsity.target`` reach its share?

    python scripts/bench_adam_sparsity.py                          # every row of docs/sparsity.md (~8 min on 2 cores)
    python scripts/bench_adam_sparsity.py --runs adamw_3e-3 plain_3e-3   # some of them

The scale is ``experiment=quick``'s: the default model (a small VGG, 864 BatchNorm channels) on
Fashion-MNIST, a fifth of each epoch (86 steps), here 4 epochs of sparse training (344 steps) and no cut,
so every row is the sparse phase alone. AdamW at lr 1e-3 (the README's example) under the quick preset's
one-cycle schedule; the SGD row is the default optimizer (lr 0.1, Nesterov) for comparison. ``plain_*``
rows take the step slimnet took before λ had a meaning under Adam (γ ← sign(γ)·max(|γ| − lr·λ, 0), the
fallback for optimizers without a known preconditioner). Each run's ``results.json`` gives the test
accuracy and the per-epoch share of |γ| < 0.01 (``sparsity.history``); its last checkpoint gives |γ|.
Writes docs/bench_adam_sparsity.json and prints the table of docs/sparsity.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from slimnet.engine.artifact import safe_load

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench_adam_sparsity"
BASE = ["experiment=quick", "prune.percent=null", "prune.epoch=null", "trainer.max_epochs=4", "latency.enabled=false",
        "logger=none", "callbacks.progress_bar=false", "save_artifact=false"]
ADAMW = ["optim.name=adamw", "optim.lr=1e-3"]
RUNS = {  # name -> overrides; quick's gamma_init 0.5 holds in every row
    "adamw_0": ADAMW + ["sparsity.lam=0"],
    "adamw_1e-3": ADAMW + ["sparsity.lam=1e-3"],
    "adamw_3e-3": ADAMW + ["sparsity.lam=3e-3"],
    "adamw_1e-2": ADAMW + ["sparsity.lam=1e-2"],
    "adamw_target_0.5": ADAMW + ["sparsity.lam=3e-3", "sparsity.target=0.5"],
    "plain_3e-3": ADAMW + ["sparsity.lam=3e-3"],
    "sgd_3e-3": ["sparsity.lam=3e-3"],
}
# The step before: no preconditioner known for Adam(W), so the plain lr·λ step (and its warning) is taken.
PLAIN = ("import runpy, torch, slimnet.sparsity.step as s; [s.PRECONDITIONERS.pop(c) for c in (torch.optim.Adam, "
         "torch.optim.AdamW)]; runpy.run_module('slimnet.train', run_name='__main__')")


def run(name: str) -> dict:
    run_dir = OUT / name
    head = [sys.executable, "-c", PLAIN] if name.startswith("plain") else [sys.executable, "-m", "slimnet.train"]
    subprocess.run([*head, *BASE, *RUNS[name], f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    results = json.loads((run_dir / "results.json").read_text())
    gammas = _gammas(run_dir / "checkpoints" / "last.ckpt")
    return {
        "run": name, "overrides": RUNS[name], "test_acc": results["test_acc"],
        "lam_last": results["sparsity"]["history"][-1]["lam"],
        "frac_small_per_epoch": [round(h["frac_small"], 4) for h in results["sparsity"]["history"]],
        "zero": float((gammas == 0).float().mean()),
        "below_0.01": float((gammas < 1e-2).float().mean()),
        "between_0.01_0.1": float(((gammas >= 1e-2) & (gammas < 0.1)).float().mean()),
        "median_kept": float(gammas[gammas >= 0.1].median()) if (gammas >= 0.1).any() else 0.0,
    }


def _gammas(ckpt: Path) -> torch.Tensor:
    """|γ| of every BatchNorm in a Lightning checkpoint (a weight with a running_mean beside it)."""
    sd = safe_load(ckpt)["state_dict"]  # slimnet's own checkpoints load with weights_only=True
    return torch.cat([w.abs().flatten() for k, w in sd.items()
                      if k.endswith(".weight") and k[:-len("weight")] + "running_mean" in sd])


def table(rows: list[dict]) -> str:
    header = ("| run | λ at the end | share < 0.01 after epoch 1 / 2 / 3 / 4 | exactly 0 | in [0.01, 0.1) | "
              "median kept |γ| | test acc |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_epoch = " / ".join(f"{x:.0%}" for x in r["frac_small_per_epoch"])
        lines.append(f"| {r['run']} | {r['lam_last']:.2g} | {per_epoch} | {r['zero']:.0%} | "
                     f"{r['between_0.01_0.1']:.0%} | {r['median_kept']:.2f} | {r['test_acc']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    rows = [run(name) for name in args.runs]
    out = ROOT / "docs" / "bench_adam_sparsity.json"
    kept = [r for r in (json.loads(out.read_text()) if out.exists() else []) if r["run"] not in args.runs]
    rows = sorted(kept + rows, key=lambda r: list(RUNS).index(r["run"]))
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
