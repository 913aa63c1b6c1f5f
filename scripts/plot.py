#!/usr/bin/env python
"""Draw a run's learning curves from metrics.jsonl as PNG figures, several runs overlaid.

    python scripts/plot.py runs/arith                          # -> runs/arith/plots/*.png
    python scripts/plot.py runs/sync runs/async --output-dir cmp --smooth 20

One figure each for reward (and its components), KL, entropy, clip fractions, completion
length, the asynchronous pipeline (staleness, idle fractions) and evaluation during training;
a figure no run has data for is skipped with a line saying so. ``--smooth W`` is the
moving-average window in steps (1 draws the raw values only). The figures are described in
``rlvr.trainer.bookkeeping.plots``. Exit status 2 on a run directory without metrics.jsonl or a
malformed line (the message names the file and line).
"""

from __future__ import annotations

import argparse
import sys

from rlvr.trainer.bookkeeping.plots import DEFAULT_SMOOTH, PlotError, plot_runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot learning curves of rlvr runs (metrics.jsonl) as PNGs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="train.py --output-dir (holds metrics.jsonl)")
    parser.add_argument("--output-dir", default=None, help="where the PNGs go (default: the first RUN_DIR/plots)")
    parser.add_argument(
        "--smooth",
        type=int,
        default=DEFAULT_SMOOTH,
        metavar="W",
        help=f"moving-average window in steps; 1 draws raw values only (default: {DEFAULT_SMOOTH})",
    )
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        written, skipped = plot_runs(args.run_dirs, args.output_dir, args.smooth)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in skipped:
        print(line)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
