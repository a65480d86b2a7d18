"""The run's report: ``results.json`` in the run dir and a summary table on the console."""

from __future__ import annotations

import json
import os

from slimnet.engine.atomic import atomic_write


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically: a reader (a sweep report, say) never sees half a file."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=float) + "\n"), binary=False)


def _fmt(value, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}{suffix}"


def _wrapped(items: list[str], width: int = 100, indent: str = "  ") -> list[str]:
    lines, line = [], ""
    for item in items:
        if line and len(line) + 2 + len(item) > width:
            lines.append(indent + line + ",")
            line = item
        else:
            line = f"{line}, {item}" if line else item
    return lines + ([indent + line] if line else [])


def _latency_lines(latency: dict | None) -> list[str]:
    """A ``target_latency`` cut: what the table predicted, what was measured (and its spread), the table."""
    if not latency:
        return []
    p, m, table = latency.get("predicted") or {}, latency.get("measured"), latency.get("table") or {}
    line = f"latency (target_latency): predicted {p.get('before_ms', 0):.3g} -> {p.get('after_ms', 0):.3g} ms"
    if p.get("fraction") is not None:
        line += f" ({100 * p['fraction']:.0f}%)"
    if m:
        line += (f"; measured {m['before_ms']:.3g} -> {m['after_ms']:.3g} ms ({100 * m['fraction']:.0f}%, "
                 f"p25-p75 {100 * m['fraction_p25']:.0f}-{100 * m['fraction_p75']:.0f}%, {m['repeats']} repeats)")
    elif latency.get("measured_skipped"):
        line += f"; not measured: {latency['measured_skipped']}"
    if table:
        line += f"; table {table.get('source')} ({table.get('seconds', 0):.1f} s)"
    return [line]


def _headline(value, metric: str):
    """A metric's number from an evaluation that may report more (detection's ``{map, map_50}``)."""
    return value.get(metric) if isinstance(value, dict) else value


def summary_table(results: dict, layers: set[str] | None = None) -> str:
    """A fixed-width table of what the run measured: the model before the cut, right after it, and
    after fine-tuning; then the threshold used and the layers whose widths changed (``layers``: the
    names to list, e.g. the convolutions without their norms; all when None)."""
    before, after = results["before"], results["after"]
    pct = lambda v: _fmt(v, 0.01, 2, "%")  # noqa: E731
    m = results.get("metric", "test_acc").removeprefix("test_")  # the task's metric: acc, map
    rows = [
        ("FLOPs", _fmt(before["flops"], 1e6, 2, "M"), _fmt(after["flops"], 1e6, 2, "M"), "",
         f"-{100 * (1 - after['flops'] / before['flops']):.1f}%"),
        ("params", _fmt(before["params"], 1e6, 3, "M"), _fmt(after["params"], 1e6, 3, "M"), "",
         f"-{100 * (1 - after['params'] / before['params']):.1f}%"),
        (f"val {m}", pct(_headline(results.get(f"val_{m}_before_cut"), m)),
         pct(_headline(results.get(f"val_{m}_after_cut"), m)), pct(results.get(f"val_{m}")), ""),
        (f"test {m}", "", "", pct(results.get(f"test_{m}")), ""),
    ]
    header = ("", "before cut", "after cut", "fine-tuned", "change")
    lines = [f"{header[0]:10s} {header[1]:>12s} {header[2]:>12s} {header[3]:>12s} {header[4]:>8s}"]
    lines += [f"{name:10s} {b:>12s} {a:>12s} {f:>12s} {c:>8s}" for name, b, a, f, c in rows]
    if results.get("threshold") is not None:
        lines.append(f"|γ| threshold used: {results['threshold']:.4g} ({results['policy']})")
    lines += _latency_lines(results.get("latency_cut"))
    changed = [(n, b, a) for n, (b, a) in (results.get("channels") or {}).items()
               if (layers is None or n in layers)]
    cut = [f"{n} {b}->{a}" for n, b, a in changed if a != b]
    if cut:
        lines.append(f"output channels before->after of the {len(cut)} layers cut ({len(changed) - len(cut)} left whole):")
        lines += _wrapped(cut)
    return "\n".join(lines)
