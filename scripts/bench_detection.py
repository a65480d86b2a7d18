"""The default detection experiment slimmed against the same detector trained unpruned for the same epochs.

    python scripts/bench_detection.py                        # both runs side by side, one thread each
    python scripts/bench_detection.py --seed 1 trainer.max_epochs=6 prune.epoch=4   # extra overrides

Runs ``python -m slimnet.train experiment=detection`` twice with one seed: once as configured (sparse
phase, cut of the backbone at ``prune.epoch``, fine-tuning) and once with no sparsity and no cut. The two
runs go in parallel, one thread each, so their wall times are comparable with each other. Reports test
mAP@[.5:.95] and mAP@.5 of both, val mAP right after the cut and at the end, the backbone's and the whole
detector's FLOPs removed, and wall times. Writes docs/bench_detection.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"slimmed": [], "unpruned": ["sparsity.lam=0", "prune.epoch=null"]}


def start(name: str, overrides: list[str], seed: int, out: Path) -> tuple[subprocess.Popen, Path, float]:
    run_dir = out / name
    cmd = [sys.executable, "-m", "slimnet.train", "experiment=detection", *overrides, *RUNS[name], f"seed={seed}",
           f"hydra.run.dir={run_dir}", "callbacks.progress_bar=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), run_dir, time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_detection")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides given to both runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {name: start(name, args.overrides, args.seed, args.out) for name in RUNS}
    rows = {}
    for name, (proc, run_dir, t0) in jobs.items():
        if proc.wait() != 0:
            sys.exit(f"{name} run failed: see {args.out / (name + '.log')}")
        r = json.loads((run_dir / "results.json").read_text())
        rows[name] = {"test_map": r["test_map"], "test_map_50": r["test_map_50"], "val_map": r["val_map"],
                      "val_map_after_cut": r.get("val_map_after_cut"), "flops_reduction": r["flops_reduction"],
                      "detector_flops_reduction": r["detector_flops_reduction"], "scope": r["scope"]["module"],
                      "flops_note": r["flops_note"], "fit_seconds": r["seconds"]["fit"],
                      "wall_seconds": time.time() - t0}
    result = {"command": " ".join(["python scripts/bench_detection.py", *sys.argv[1:]]), "seed": args.seed, **rows}
    (ROOT / "docs" / "bench_detection.json").write_text(json.dumps(result, indent=2) + "\n")
    s, u = rows["slimmed"], rows["unpruned"]
    cut = s["val_map_after_cut"] or {}
    lines = [
        "# Detection: the default experiment slimmed vs unpruned", "",
        f"Reproduce: `{result['command']}` (the two runs in parallel, one thread each).", "",
        f"`experiment=detection`, seed {args.seed}; FLOPs of {s['flops_note']}.", "",
        "| run | test mAP | test mAP@.5 | val mAP right after the cut | val mAP at the end "
        "| backbone FLOPs removed | detector FLOPs removed | fit time |",
        "|---|---|---|---|---|---|---|---|",
        f"| unpruned | {u['test_map']:.3f} | {u['test_map_50']:.3f} | – | {u['val_map']:.3f} | – | – "
        f"| {u['fit_seconds'] / 60:.1f} min |",
        f"| slimmed | {s['test_map']:.3f} | {s['test_map_50']:.3f} | {cut.get('map', float('nan')):.3f} "
        f"| {s['val_map']:.3f} | {s['flops_reduction']:.1%} | {s['detector_flops_reduction']:.1%} "
        f"| {s['fit_seconds'] / 60:.1f} min |", "",
        f"Slimmed minus unpruned: {100 * (s['test_map'] - u['test_map']):+.1f} mAP points "
        f"({100 * (s['test_map_50'] - u['test_map_50']):+.1f} at IoU .5).", "",
    ]
    (ROOT / "docs" / "bench_detection.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
