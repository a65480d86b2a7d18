"""The default run against an unpruned run of the same epochs, on this machine.

    python scripts/bench_default.py            # ~15 min on 2 CPU cores; writes docs/bench_default.{json,md}
    python scripts/bench_default.py --seeds 0 1 2

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

from slimnet.latency import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "slimmed (default)": [],
    "unpruned, same epochs": ["experiment=baseline"],
}


def run(name: str, overrides: list[str], seed: int, out: Path) -> dict:
    run_dir = out / f"{name.split()[0].strip(',')}-seed{seed}"
    cmd = [sys.executable, "-m", "slimnet.train", *overrides, f"seed={seed}", f"hydra.run.dir={run_dir}",
           "callbacks.progress_bar=false"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    return {"run": name, "seed": seed, "wall_seconds": wall, "test_acc": results["test_acc"],
            "val_acc_after_cut": results.get("val_acc_after_cut"), "flops": results["after"]["flops"],
            "flops_before": results["before"]["flops"], "params": results["after"]["params"],
            "params_before": results["before"]["params"], "flops_reduction": results["flops_reduction"],
            "params_reduction": results["params_reduction"], "threshold": results["threshold"],
            "channels": {k: v[1] for k, v in results["channels"].items() if not k.startswith("classifier")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_default")
    args = parser.parse_args()
    rows = [run(name, overrides, seed, args.out) for seed in args.seeds for name, overrides in RUNS.items()]
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
           "threads": torch.get_num_threads()}
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
    table = "\n".join(lines)
    (ROOT / "docs" / "bench_default.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
