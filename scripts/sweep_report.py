"""Write a sweep's report on demand: sweep.csv and acc_vs_flops.png in the sweep folder.

    python scripts/sweep_report.py outputs/multirun/2026-11-22/10-00-00
    python scripts/sweep_report.py <sweep_dir> --baseline outputs/<unpruned run made with experiment=baseline>

Works on a finished, partial or failed sweep: it reads each job's results.json.
"""

from __future__ import annotations

import argparse
import logging

from slimnet.sweep import report

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--baseline", help="run dir of an unpruned run (experiment=baseline) to plot as reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    csv_path, png_path = report(args.sweep_dir, baseline=args.baseline)
    print(csv_path)
    print(png_path)
