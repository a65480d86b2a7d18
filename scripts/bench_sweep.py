"""A threshold sweep that trains the sparse phase once, against independent runs of the same points.

    python scripts/bench_sweep.py                                   # default settings (~35 min, 2 cores)
    python scripts/bench_sweep.py trainer.limit_train_batches=0.2   # the same comparison, ~5x quicker

Both sides use the real command line with the same overrides: (a) one multirun over the thresholds with
a fresh sparse-phase cache, (b) one run per threshold with ``prune.reuse_sparse=false``. The target is
wall(a) <= (1 sparse phase + N fine-tunes) x 1.05. "N fine-tunes" is read two ways: the runs' own phase
timers (training epochs only), and the independent runs' whole wall time minus the sparse phase of all
but one of them, which also counts what every job pays anyway (start-up, data loading, the test set,
latency, the artifact). Writes docs/bench_sweep.json and .md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = [0.02, 0.05, 0.1, 0.2]
QUIET = ["callbacks.progress_bar=false", "logger=none"]


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slimnet.train", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    overrides = sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="bench_sweep."))
    sweep_dir, cache = work / "sweep", work / "cache"
    thresholds = ",".join(str(t) for t in THRESHOLDS)
    sweep_wall = _run(["-m", f"+prune.thresh={thresholds}", f"hydra.sweep.dir={sweep_dir}",
                       f"prune.cache_dir={cache}", *QUIET, *overrides])
    jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    alone_walls, alone = [], []
    for t in THRESHOLDS:
        run_dir = work / f"alone-{t}"
        alone_walls.append(_run([f"+prune.thresh={t}", f"hydra.run.dir={run_dir}", "prune.reuse_sparse=false",
                                 *QUIET, *overrides]))
        alone.append(json.loads((run_dir / "results.json").read_text()))
    sparse = next(j["seconds"]["sparse"] for j in jobs if not j["sparse_phase"]["reused"])
    finetunes = sum(j["seconds"]["finetune"] for j in jobs)
    # What the N independent runs cost with the sparse phase paid once: their wall time minus the
    # sparse phase of all but one (each run's own timer).
    alone_sparse = [a["seconds"]["sparse"] for a in alone]
    ideal = sum(alone_walls) - sum(alone_sparse) + max(alone_sparse)
    result = {
        "overrides": overrides, "thresholds": THRESHOLDS,
        "sweep_wall_seconds": sweep_wall, "independent_wall_seconds": sum(alone_walls),
        "speedup": sum(alone_walls) / sweep_wall,
        "sparse_phase_seconds": sparse, "finetune_seconds_total": finetunes,
        "bound_seconds": 1.05 * (sparse + finetunes),
        "ideal_whole_runs_seconds": ideal, "bound_whole_runs_seconds": 1.05 * ideal,
        "sweep_over_ideal": sweep_wall / ideal,
        "sparse_epochs_trained": sum(j["epochs_trained_here"]["sparse"] for j in jobs),
        "same_architectures": [j["channels"] for j in jobs] == [a["channels"] for a in alone],
    }
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "bench_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"| | wall time |\n|---|---|\n"
          f"| sweep of {len(THRESHOLDS)} thresholds, shared sparse phase | {sweep_wall / 60:.1f} min |\n"
          f"| {len(THRESHOLDS)} independent runs | {sum(alone_walls) / 60:.1f} min |\n"
          f"| 1.05 × (1 sparse phase + {len(THRESHOLDS)} fine-tunes), from the runs' phase timers | "
          f"{result['bound_seconds'] / 60:.1f} min |\n"
          f"| 1.05 × (the independent runs with the sparse phase paid once: their wall minus "
          f"{len(THRESHOLDS) - 1} sparse phases) | {result['bound_whole_runs_seconds'] / 60:.1f} min |\n\n"
          f"Sweep ÷ independent runs: {1 / result['speedup']:.2f}; sweep ÷ (1 sparse phase + "
          f"{len(THRESHOLDS)} whole fine-tune jobs): {result['sweep_over_ideal']:.2f}. "
          f"Sparse epochs trained in the sweep: {result['sparse_epochs_trained']}; architectures equal to the "
          f"independent runs': {result['same_architectures']}. Overrides: `{' '.join(overrides) or '(defaults)'}`.\n")
    (ROOT / "docs" / "bench_sweep.md").write_text(md)
    print(md)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
