"""The run's report: ``results.json`` in the run dir and a summary table on the console."""

from __future__ import annotations

import json
import os

from slimnet._atomic import atomic_write


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically: a reader (a sweep report, say) never sees half a file."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=float) + "\n"), binary=False)


def _fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}{suffix}"


def summary_table(results: dict) -> str:
    """A fixed-width table of what the run measured, before and after surgery."""
    before, after = results["before"], results["after"]
    rows = [
        ("FLOPs", _fmt(before["flops"], 1e6, 2, "M"), _fmt(after["flops"], 1e6, 2, "M"),
         f"-{100 * (1 - after['flops'] / before['flops']):.1f}%"),
        ("params", _fmt(before["params"], 1e6, 3, "M"), _fmt(after["params"], 1e6, 3, "M"),
         f"-{100 * (1 - after['params'] / before['params']):.1f}%"),
        ("val acc", _fmt(results.get("val_acc_after_cut"), 0.01, 2, "%") + " (right after cut)",
         _fmt(results.get("val_acc"), 0.01, 2, "%"), ""),
        ("test acc", "", _fmt(results.get("test_acc"), 0.01, 2, "%"), ""),
    ]
    lines = [f"{'':10s} {'before':>28s} {'after':>12s} {'change':>8s}"]
    lines += [f"{name:10s} {b:>28s} {a:>12s} {c:>8s}" for name, b, a, c in rows]
    if results.get("threshold") is not None:
        lines.append(f"|γ| threshold used: {results['threshold']:.4g} ({results['policy']})")
    if results.get("channels"):
        kept = ", ".join(f"{n} {b}->{a}" for n, (b, a) in list(results["channels"].items())[:12])
        lines.append(f"channels: {kept}{' …' if len(results['channels']) > 12 else ''}")
    return "\n".join(lines)
