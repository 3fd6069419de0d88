#!/usr/bin/env python3
"""Redraw a run's plots (curves, weight drift, first-layer tiles) from its report.json.

python scripts/plot.py runs/latest/report.json [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exchange.errors import ExchangeError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out-dir", type=Path, help="default: the report's folder")
    args = parser.parse_args(argv)
    from frameworks.plots import plot_report

    try:
        for path in plot_report(args.report, args.out_dir):
            print(f"wrote {path}")
    except (OSError, json.JSONDecodeError, KeyError, ExchangeError) as err:
        print(f"error: {args.report}: cannot plot ({err})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
