"""``python -m slimnet.export <run dir | pruned.pt | detection checkpoint> key=value …``: export a cut model
and check that the exported file computes what PyTorch computes (docs/deployment.md).

    python -m slimnet.export outputs/<date>/<time> format=onnx
    python -m slimnet.export outputs/<detection run> format=torchscript

A pruned artifact goes to ``slimnet.deploy.export``; a run whose task has an exporter of its own (a
detection run, or its .ckpt) to that exporter (``TaskPlugin.export``). The command line lives here, at the top, so that the
deployment room below never imports a task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimnet.deploy.export import DEFAULT_ATOL, DEFAULT_RTOL, FORMATS, ExportReport, export_artifact
from slimnet.locate import locate


def export(source: str | Path, format: str = "onnx", **flags) -> ExportReport:
    """Export and check whatever ``source`` is: a run whose task exports itself (a detection run, or its
    .ckpt), else a pruned artifact."""
    exporter = task_exporter(source)
    if exporter is not None:
        flags.pop("data", None)  # a detector is checked on random images of its own input size
        return exporter(source, format, **flags)
    return export_artifact(source, format, **flags)


def task_exporter(source: str | Path):
    """The exporter of the task a run directory's results.json names (``task_target``), when that task
    has its own (``TaskPlugin.export``); a Lightning ``.ckpt`` is a detection checkpoint (a classification
    run exports its pruned.pt)."""
    source = Path(source)
    if source.suffix == ".ckpt":
        from slimnet.tasks.detection.plugin import Detection

        return Detection.export
    results = source / "results.json"
    if not (source.is_dir() and results.is_file()):
        return None
    try:
        target = json.loads(results.read_text()).get("task_target")
    except json.JSONDecodeError:
        return None
    return getattr(locate(target), "export", None) if target else None


# --------------------------------------------------------------------------------------------------
# Command line: a path, then key=value flags (the same syntax as python -m slimnet.train overrides)
# --------------------------------------------------------------------------------------------------

# key -> (type, default, help)
OPTIONS = {
    "format": (str, "onnx", "onnx | torchscript | pt2 (torch.export; TorchScript is deprecated in 2.14)"),
    "out": (str, None, "output file (default: beside the artifact, pruned.onnx / .torchscript.pt / .pt2)"),
    "batch": (int, 8, "inputs in the numerical check"),
    "opset": (int, None, "ONNX opset (default: torch's, 20 in torch 2.14)"),
    "atol": (float, DEFAULT_ATOL, "absolute tolerance of the check"),
    "rtol": (float, DEFAULT_RTOL, "relative tolerance, times max|PyTorch output|"),
    "input_size": (str, None, "H or HxW, when the run does not record its input shape"),
    "data": (str, "auto", "auto (the run's data) | random | a dataset name, e.g. fashion_mnist"),
}


def _parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {k + '=' + ('null' if d is None else str(d)):<18} {h}"
                     for k, (_, d, h) in OPTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m slimnet.export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a pruned model (a pruned.pt artifact, or a run dir holding one) and check the "
                    "exported file against PyTorch on real test images (random inputs if the data is "
                    "unknown).",
        epilog=f"flags (key=value):\n{keys}\n\nexit status: 0 ok, 1 numerical check failed, 2 usage or "
               "input error\nexample:\n  python -m slimnet.export outputs/2026-05-09/10-00-00 format=onnx")
    parser.add_argument("source", help="pruned artifact (.pt) or a run directory containing pruned.pt; a "
                                       "detection run directory or its .ckpt (onnx or torchscript)")
    parser.add_argument("flags", nargs="*", metavar="key=value", help="see the flags below")
    return parser


def parse_flags(parser: argparse.ArgumentParser, flags: list[str]) -> dict:
    values = {k: d for k, (_, d, _) in OPTIONS.items()}
    for flag in flags:
        key, sep, raw = flag.lstrip("-").partition("=")
        if not sep or key not in OPTIONS:
            parser.error(f"unknown flag {flag!r}; use key=value with key one of: {', '.join(OPTIONS)}")
        kind = OPTIONS[key][0]
        try:
            values[key] = None if raw.lower() in ("null", "none") else kind(raw)
        except ValueError:
            parser.error(f"{key}={raw!r}: expected a {kind.__name__}")
    if values["format"] not in FORMATS:
        parser.error(f"format={values['format']!r}; choose one of: {', '.join(FORMATS)}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    flags = parse_flags(parser, args.flags)
    try:
        report = export(args.source, **flags)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"slimnet.export: {err}", file=sys.stderr)
        return 2
    size_kb = Path(report.path).stat().st_size / 1024
    print(f"exported {report.path} ({report.format}, {size_kb:.0f} KB) in {report.export_seconds:.1f} s")
    print(report.summary())
    if not report.passed:
        print(f"slimnet.export: FAILED: {report.format} output differs from PyTorch by "
              f"{report.max_abs_diff:.3g} > tolerance {report.tolerance:.3g} on {report.inputs}; "
              f"do not deploy {report.path}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
