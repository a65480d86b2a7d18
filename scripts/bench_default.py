"""The default run against an unpruned run of the same epochs, on this machine.

    python scripts/bench_default.py            # both runs in turn; writes docs/bench_default.{json,md}
    python scripts/bench_default.py --seeds 0 1 2
    python scripts/bench_default.py trainer.max_epochs=14   # any override, given to both runs

The sparse-phase cache is switched off (``prune.reuse_sparse=false``): a wall time must include the
sparse phase. Hosts of one machine kind differ ~2.6x in speed, so the script first times 20 plain SGD
steps of the unpruned model (batch 128, no Lightning) and records that rate beside the wall times.

Each run is the real command line (``python -m slimnet.train``) in a subprocess; wall time is measured
around the whole process (start-up, data loading, training, test, report). Numbers are read back from
each run's ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from slimnet.deploy.latency import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "slimmed (default)": [],
    "unpruned, same epochs": ["experiment=baseline"],
}


def _short(name: str) -> str:
    """ "unpruned, same epochs" -> "unpruned": the run's directory name and its --runs choice."""
    return name.split()[0].strip(",")


def host_images_per_second(steps: int = 20) -> float:
    """Training images/s of the default model in a bare SGD loop: the speed of this host, for scale."""
    from slimnet.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg_small", num_classes=10, in_channels=1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 128 / (time.perf_counter() - start)


def run(name: str, overrides: list[str], seed: int, out: Path) -> dict:
    run_dir = out / f"{_short(name)}-seed{seed}"
    cmd = [sys.executable, "-m", "slimnet.train", *overrides, f"seed={seed}", f"hydra.run.dir={run_dir}",
           "callbacks.progress_bar=false", "prune.reuse_sparse=false"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    return {"run": name, "seed": seed, "wall_seconds": wall, "seconds": results["seconds"],
            "test_acc": results["test_acc"],
            "val_acc_after_cut": results.get("val_acc_after_cut"), "flops": results["after"]["flops"],
            "flops_before": results["before"]["flops"], "params": results["after"]["params"],
            "params_before": results["before"]["params"], "flops_reduction": results["flops_reduction"],
            "params_reduction": results["params_reduction"], "threshold": results["threshold"],
            "channels": {k: v[1] for k, v in results["channels"].items() if not k.startswith("classifier")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_default")
    parser.add_argument("--runs", nargs="+", choices=[_short(name) for name in RUNS],
                        default=[_short(name) for name in RUNS], help="which of the two runs to make")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to both runs")
    args = parser.parse_args()
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "host_train_images_per_second": host_images_per_second(),
           "overrides": args.overrides}
    rows = [run(name, [*overrides, *args.overrides], seed, args.out)
            for seed in args.seeds for name, overrides in RUNS.items()
            if _short(name) in args.runs]
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench_default.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")

    lines = ["| run | seed | wall time | test acc | FLOPs | params | val acc right after cut |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cut = f"{100 * r['val_acc_after_cut']:.2f}%" if r["val_acc_after_cut"] is not None else "—"
        lines.append(f"| {r['run']} | {r['seed']} | {r['wall_seconds'] / 60:.1f} min | {100 * r['test_acc']:.2f}% | "
                     f"{r['flops'] / 1e6:.1f}M (−{100 * r['flops_reduction']:.1f}%) | "
                     f"{r['params'] / 1e6:.3f}M (−{100 * r['params_reduction']:.1f}%) | {cut} |")
    for name in RUNS:
        accs = [r["test_acc"] for r in rows if r["run"] == name]
        if len(accs) > 1:
            lines.append(f"\n{name}: mean test acc {100 * statistics.mean(accs):.2f}% "
                         f"± {100 * statistics.stdev(accs):.2f} over seeds {args.seeds}")
    lines.append(f"\nHost: {env['cpu']}, {env['threads']} threads, bare training step of the unpruned model "
                 f"{env['host_train_images_per_second']:.0f} img/s. "
                 f"Overrides: {' '.join(args.overrides) or 'none'}.")
    table = "\n".join(lines)
    (ROOT / "docs" / "bench_default.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
