"""Sweep reports: one CSV row per job and the accuracy-versus-FLOPs picture.

Each job of a multirun writes its own ``results.json`` (a failed job writes one with
``"status": "failed"``), so the report only globs the sweep folder: it works the same after a joblib or
SLURM sweep, when some jobs failed, or on demand (``python scripts/sweep_report.py <sweep_dir>``).
``SweepReportCallback`` runs it automatically when a multirun ends.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = ["job", "status", "overrides", "metric", "thresh", "percent", "target_flops", "target_latency", "latency_ms", "threshold_used", "flops",
           "flops_before", "flops_reduction", "params", "params_before", "val_acc", "val_acc_after_cut",
           "test_acc", "speedup", "sparse_reused", "channels", "error"]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders: those Hydra wrote a config into (so a job that died before any result still shows)."""
    dirs = {p.parent.parent for p in sweep_dir.glob("**/.hydra/config.yaml")}
    dirs |= {p.parent for p in sweep_dir.glob("**/results.json")}
    return sorted((d for d in dirs if d != sweep_dir), key=lambda d: (len(d.parts), _natural(d.name)))


def _natural(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def _overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    lines = [ln[2:].strip() for ln in path.read_text().splitlines() if ln.startswith("- ")]
    return " ".join(lines)


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job found under ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job_dir in _job_dirs(sweep_dir):
        row = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": _overrides(job_dir)}
        path = job_dir / "results.json"
        if not path.is_file():
            rows.append({**row, "status": "incomplete"})
            continue
        r = json.loads(path.read_text())
        if r.get("status") == "failed":
            rows.append({**row, "status": "failed", "error": r.get("error", "")})
            continue
        prune = r.get("prune", {})
        metric = r.get("metric", "test_acc")
        latency = r.get("latency") or {}
        rows.append({
            **row, "status": "ok", "thresh": prune.get("thresh"), "percent": prune.get("percent"),
            "target_flops": prune.get("target_flops"), "target_latency": prune.get("target_latency"),
            "latency_ms": ((r.get("latency_cut") or {}).get("measured") or {}).get("after_ms"),
            **_measured_latency(latency), "threshold_used": r.get("threshold"),
            "flops": r["after"]["flops"], "flops_before": r["before"]["flops"],
            "flops_reduction": r["flops_reduction"], "params": r["after"]["params"],
            "params_before": r["before"]["params"], "val_acc": r.get("val_acc"),
            "val_acc_after_cut": r.get("val_acc_after_cut"), "test_acc": r.get("test_acc"),
            "speedup": latency.get("speedup"), **latency.get("columns", {}),
            "metric": metric, metric: r.get(metric),  # the task's headline (test_acc, test_map)
            "sparse_reused": (r.get("sparse_phase") or {}).get("reused"),
            "channels": json.dumps({k: v[1] for k, v in r.get("channels", {}).items()}),
            # detection runs: mAP@.5, and the whole detector's FLOPs beside the cut part's
            "test_map_50": r.get("test_map_50"),
            "detector_flops": (r["after"].get("detector_flops") or {}).get("total"),
            "detector_flops_before": (r["before"].get("detector_flops") or {}).get("total"),
        })
    return rows


def _measured_latency(latency: dict) -> dict:
    """The cut and the unpruned model's latency as the run measured them side by side (``latency.*``: eager,
    the smallest batch), the x axis of the latency picture."""
    rows = [r for r in latency.get("rows", []) if r.get("backend") == "eager"]
    if not rows:
        return {}
    row = min(rows, key=lambda r: r["batch"])
    return {"latency_ms_measured": row["b"]["median_ms"], "latency_ms_unpruned": row["a"]["median_ms"],
            "latency_batch": row["batch"]}


def write_csv(rows: list[dict], path: str | Path) -> None:
    """The fixed columns, then any measured latency columns (``speedup_eager_b16``, ``efficiency_…``)."""
    extra = sorted({k for row in rows for k in row if k not in COLUMNS})
    columns = COLUMNS + extra
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer FLOPs and higher accuracy, by increasing FLOPs."""
    front, best = [], -1.0
    for flops, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((flops, acc))
            best = acc
    return front


def _policy(row: dict) -> str:
    """What a job asked for, short: ``t=0.2``, ``F≤0.5``, ``p=0.63`` (empty for an unpruned reference)."""
    if row.get("thresh") is not None:
        return f"t={row['thresh']}" if isinstance(row["thresh"], str) else f"t={row['thresh']:g}"
    if row.get("target_flops") is not None:
        return f"F≤{row['target_flops']:g}"
    if row.get("target_latency") is not None:
        return f"L≤{row['target_latency']:g}"
    if row.get("percent") is not None:
        return f"p={row['percent']:g}"
    return ""


def kind_of(row: dict) -> str:
    """``unpruned`` (a reference trained without a cut), ``cut nothing`` (a policy that removed no
    channel: a threshold below every |γ|, or percent 0) or ``pruned``."""
    if row.get("flops_reduction") not in (0, 0.0, None):
        return "pruned"
    return "cut nothing" if _policy(row) and row.get("percent") != 0 else "unpruned"


def coinciding(rows: list[dict], metric: str, x: str = "flops") -> list[list[dict]]:
    """Jobs grouped by the point they land on (same FLOPs and the same metric to 0.01 pp): several
    thresholds that make the same cut draw one marker, labelled with all of them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r[x], round(100 * r[metric], 2), kind_of(r)), []).append(r)
    return sorted(groups.values(), key=lambda g: g[0][x])


def _group_label(group: list[dict]) -> str:
    labels = [_policy(r) or "unpruned" for r in group]
    if len(group) == 1:
        return labels[0]
    key = labels[0].split("=")[0] if all("=" in lb for lb in labels) else None
    if key is not None and all(lb.startswith(key + "=") for lb in labels):  # t=0.05, 0.1, 0.2
        values = ", ".join(lb.split("=", 1)[1] for lb in labels)
        return f"{key}={values} ({len(group)} jobs)"
    return ", ".join(labels) + f" ({len(group)} jobs)"


_STYLE = {  # kind: marker, size, face colour, edge colour, legend label
    "pruned": ("o", 40, "tab:blue", "tab:blue", "pruned runs"),
    "cut nothing": ("o", 60, "none", "tab:orange", "threshold cut nothing"),
    "unpruned": ("*", 160, "tab:red", "tab:red", "unpruned"),
}


# x axes of the sweep's pictures: column, the column of the unpruned model, scale, label
AXES = {"flops": ("flops", "flops_before", 1e6, "FLOPs per image (M, 2×MACs)"),
        "latency": ("latency_ms_measured", "latency_ms_unpruned", 1.0, "measured latency of the cut model (ms)")}


def plot(rows: list[dict], path: str | Path, metric: str = "test_acc", axis: str = "flops") -> None:
    """Accuracy against FLOPs (or measured latency): every job drawn as what it is (pruned, a threshold
    that cut nothing, an unpruned reference), labelled by its policy; jobs that land on one point share
    one marker and one label that says so; the Pareto front of the pruned runs."""
    xk, before_key, scale, x_label = AXES[axis]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r["status"] == "ok" and r.get(metric) is not None and r.get(xk) is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    notes = []
    if ok:
        groups = coinciding(ok, metric, xk)
        for kind, (marker, size, face, edge, label) in _STYLE.items():
            mine = [g for g in groups if kind_of(g[0]) == kind]
            if mine:
                ax.scatter([g[0][xk] / scale for g in mine], [100 * g[0][metric] for g in mine], marker=marker,
                           s=size, facecolors=face, edgecolors=edge, linewidths=1.5, zorder=3 + (kind != "pruned"),
                           label=label)
        if not any(kind_of(r) == "unpruned" for r in ok) and ok[0].get(before_key):  # where the model starts
            ax.axvline(ok[0][before_key] / scale, color="tab:red", ls=":", label=f"unpruned {axis}")
        for i, g in enumerate(groups):  # neighbours sit close together: alternate labels above and below
            ax.annotate(_group_label(g), (g[0][xk] / scale, 100 * g[0][metric]), textcoords="offset points",
                        xytext=(6, 7 if i % 2 == 0 else -13), fontsize=8)
        shared = sum(len(g) for g in groups if len(g) > 1)
        if shared:
            notes.append(f"{shared} jobs share {sum(len(g) > 1 for g in groups)} point(s)")
        nothing = [r for r in ok if kind_of(r) == "cut nothing"]
        if nothing:
            notes.append(f"{len(nothing)} cut nothing: a lower threshold or prune.percent cuts")
        xs = [r[xk] for r in ok]
        if max(xs) > 20 * min(xs):  # deep cuts span orders of magnitude: spread them out
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.12, y=0.12)
        pruned = [r for r in ok if kind_of(r) == "pruned"]
        if len(pruned) > 1:
            front = pareto_front([(r[xk] / scale, 100 * r[metric]) for r in pruned])
            ax.step([f for f, _ in front], [a for _, a in front], where="post", color="tab:green", alpha=0.7,
                    label="Pareto front")
    failed = [r for r in rows if r["status"] != "ok"]
    name = metric.replace("_", " ")
    title = f"{name} vs {'FLOPs' if axis == 'flops' else 'measured latency'} ({len(ok)} runs" + (
        f", {len(failed)} failed)" if failed else ")")
    ax.set(xlabel=x_label, ylabel=f"{name} (%)", title=title)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(loc="lower right", fontsize=8)
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def baseline_row(run_dir: str | Path) -> dict:
    """A separate unpruned run (``experiment=baseline``: no sparsity, no cut) as the sweep's reference."""
    run_dir = Path(run_dir)
    r = json.loads((run_dir / "results.json").read_text())
    return {"job": f"baseline:{run_dir}", "status": "ok", "overrides": "experiment=baseline",
            "flops": r["after"]["flops"], "flops_before": r["before"]["flops"], "flops_reduction": 0.0,
            "params": r["after"]["params"], "params_before": r["before"]["params"], "val_acc": r.get("val_acc"),
            "test_acc": r.get("test_acc")}


def report(sweep_dir: str | Path, baseline: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``sweep.csv`` and ``acc_vs_flops.png`` into ``sweep_dir``; return their paths.

    ``baseline``: the run dir of an unpruned run trained without sparsity, added as the reference
    point (a ``prune.percent=0`` job inside the sweep is the other kind of reference: sparsity-trained,
    not cut, sharing the sweep's sparse phase).
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) + ([baseline_row(baseline)] if baseline is not None else [])
    csv_path, png_path = sweep_dir / "sweep.csv", sweep_dir / "acc_vs_flops.png"
    write_csv(rows, csv_path)
    metrics = [r["metric"] for r in rows if r.get("metric")]  # each run names its task's headline metric
    metric = max(set(metrics), key=metrics.count) if metrics else "test_acc"
    plot(rows, png_path, metric=metric)
    if sum(r.get("latency_ms_measured") is not None for r in rows) > 1:  # beside FLOPs: what was measured
        plot(rows, sweep_dir / "acc_vs_latency.png", metric=metric, axis="latency")
    log.info("sweep report: %s, %s (%d jobs, %d ok)", csv_path, png_path, len(rows),
             sum(r["status"] == "ok" for r in rows))
    nothing = [r for r in rows if r["status"] == "ok" and kind_of(r) == "cut nothing"]
    if nothing:
        log.warning("%d job(s) cut nothing (%s): their threshold is below every |γ| this sparse phase left; see "
                    "each job's log for the |γ| quantiles, or use prune.percent / prune.target_flops",
                    len(nothing), ", ".join(_policy(r) for r in nothing))
    return csv_path, png_path


class SweepReportCallback(Callback):
    """Hydra callback: write the sweep report when a multirun ends (configured in conf/hydra/default.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        report(config.hydra.sweep.dir)
