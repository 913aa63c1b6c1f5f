"""Score model outputs you already have, with no model and no GPU.

    python scripts/verify.py --input outputs.jsonl [--output verdicts.jsonl]
        [--verifier gsm8k|math|code|format] [--workers N] [--timeout S]
    python scripts/verify.py --env gsm8k [--env-kwargs JSON] [--limit N] [--output verdicts.jsonl]

Each input line: {"id", "completion", "answer" | "tests", optional "verifier"}. Writes one
verdict per line (id, line, verifier, score, parsed, reason), in input order, and prints a
summary table. With ``--env`` it instead steps every bundled task's gold answer through
that environment (each must score 1; exit 1 when one does not). Exit code: 0 when every
line was well-formed, 3 when some were malformed (they still get a verdict naming the
line and the problem), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlvr.verifiers.batch_file import verify_file
from rlvr.verifiers.registry import VERIFIERS

EXIT_MALFORMED = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", type=Path, help="JSONL (or .jsonl.gz) of completions")
    what.add_argument("--env", help="check an environment's gold answers instead (name or module:Class)")
    p.add_argument("--env-kwargs", default="{}", help="JSON constructor arguments for --env")
    p.add_argument("--limit", type=int, default=None, help="with --env: check only the first N tasks")
    p.add_argument("--output", type=Path, help="where verdicts go (default: INPUT stem + .verdicts.jsonl)")
    p.add_argument("--verifier", choices=sorted(VERIFIERS), help="for lines without a 'verifier' field")
    p.add_argument("--workers", type=int, default=None, help="worker processes/threads (default: per verifier)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per item (default: per verifier)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.env is not None:
        return check_env_gold(args.env, args.env_kwargs, args.limit, args.output)
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


def check_env_gold(env: str, env_kwargs: str, limit: int | None, output: Path | None) -> int:
    """Score every task's reference answer through the environment; all must score 1."""
    from rlvr.envs.checker import check_gold
    from rlvr.envs.registry import parse_env_kwargs

    start = time.perf_counter()
    results = check_gold(env, limit, **parse_env_kwargs(env_kwargs))
    seconds = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if output is not None:
        with output.open("w", encoding="utf-8") as out:
            for r in results:
                out.write(json.dumps({"id": r.task_id, "index": r.index, "reward": r.reward,
                                      "max_reward": r.max_reward, **r.verdict.to_dict()}) + "\n")
    print(f"env {env}: {len(results)} gold answers, {len(results) - len(failed)} scored 1, "
          f"{len(failed)} did not ({seconds:.2f} s)")
    for r in failed[:20]:
        print(f"  {r.task_id}: reward {r.reward} of {r.max_reward} ({r.verdict.reason})")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
