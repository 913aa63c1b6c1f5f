"""Score model outputs you already have, with no model and no GPU.

    python scripts/verify.py --input outputs.jsonl [--output verdicts.jsonl]
        [--verifier gsm8k|math|code|format] [--workers N] [--timeout S]

Each input line: {"id", "completion", "answer" | "tests", optional "verifier"}. Writes one
verdict per line (id, line, verifier, score, parsed, reason), in input order, and prints a
summary table. Exit code: 0 when every line was well-formed, 3 when some were malformed
(they still get a verdict naming the line and the problem), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlvr.verifiers.batch_file import verify_file
from rlvr.verifiers.registry import VERIFIERS

EXIT_MALFORMED = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True, help="JSONL (or .jsonl.gz) of completions")
    p.add_argument("--output", type=Path, help="where verdicts go (default: INPUT stem + .verdicts.jsonl)")
    p.add_argument("--verifier", choices=sorted(VERIFIERS), help="for lines without a 'verifier' field")
    p.add_argument("--workers", type=int, default=None, help="worker processes/threads (default: per verifier)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per item (default: per verifier)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.input.is_file():
        p.error(f"--input {args.input}: no such file")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be >= 1")
    if args.timeout is not None and args.timeout <= 0:
        p.error("--timeout must be > 0")
    out_path = args.output or args.input.with_name(args.input.name.split(".")[0] + ".verdicts.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as out:
        summary = verify_file(args.input, out, verifier=args.verifier, timeout=args.timeout,
                              workers=args.workers, progress=not args.no_progress)
    print(summary.table())
    print(f"verdicts written to {out_path}")
    if summary.malformed:
        print(f"{summary.malformed} malformed line(s): see their 'reason' in the output", file=sys.stderr)
        return EXIT_MALFORMED
    return 0


if __name__ == "__main__":
    sys.exit(main())
