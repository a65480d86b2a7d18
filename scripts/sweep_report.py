"""Write a sweep's report on demand: sweep.csv and acc_vs_flops.png in the sweep folder.

    python scripts/sweep_report.py outputs/multirun/2026-11-22/10-00-00
    python scripts/sweep_report.py <sweep_dir> --baseline outputs/<unpruned run made with experiment=baseline>
    python scripts/sweep_report.py --csv docs/sweep_curve.csv --png docs/acc_vs_flops.png   # redraw a kept CSV

Works on a finished, partial or failed sweep: it reads each job's results.json.
"""

from __future__ import annotations

import argparse
import csv
import logging

from slimnet.run.sweep import plot, report


def rows_from_csv(path: str) -> list[dict]:
    """A written sweep.csv back as report rows: numbers as numbers, empty cells as None."""
    def value(text: str):
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: (v if k in ("job", "status", "overrides") else value(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?")
    parser.add_argument("--baseline", help="run dir of an unpruned run (experiment=baseline) to plot as reference")
    parser.add_argument("--csv", help="redraw the curve of this sweep.csv instead of reading a sweep folder")
    parser.add_argument("--png", help="with --csv: where to write the curve")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.csv:
        rows = rows_from_csv(args.csv)
        metric = "test_map" if any(r.get("test_map") is not None for r in rows) else "test_acc"
        plot(rows, args.png or args.csv.replace(".csv", ".png"), metric=metric)
        print(args.png)
        raise SystemExit(0)
    if not args.sweep_dir:
        parser.error("give a sweep folder, or --csv")
    csv_path, png_path = report(args.sweep_dir, baseline=args.baseline)
    print(csv_path)
    print(png_path)
