"""Evaluate a model on an environment: pass@1, pass@k, maj@k, mean reward per component, no training.

    python scripts/evaluate.py --env arithmetic --limit 200 [--model PATH_OR_HUB_ID]
    python scripts/evaluate.py --env gsm8k --num-samples 16 --temperature 0.8 --summary-json summary.json
        [--top-p P] [--max-new-tokens N] [--seed S] [--output tasks.jsonl] [--generator vllm]

With no --model it evaluates the bundled default model; a training checkpoint folder
(runs/.../checkpoints/step_000020) works as --model. One sample is greedy by default;
several are sampled at temperature 1 by default (greedy samples would all be the same).
pass@k is reported for every power of two k up to --num-samples and for --num-samples
itself (rlvr.trainer.bookkeeping.passk). --num-tasks and --samples are the old names of --limit and
--num-samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from rlvr.envs.registry import RegistryError
from rlvr.trainer.bookkeeping.evaluation import evaluate, format_table
from rlvr.trainer.bookkeeping.metrics import log_to_stderr
from rlvr.trainer.config import GENERATORS
from rlvr.trainer.engines.build import EngineUnavailable
from rlvr.trainer.flags import json_object_arg
from rlvr.trainer.protocols import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="pass@k, maj@k and mean reward of a model on an rlvr environment")
    p.add_argument("--env", required=True, help="short name, gymnasium id, module:Class or file.py:Class")
    p.add_argument("--env-kwargs", type=json_object_arg, default={}, help="JSON object of env arguments")
    p.add_argument("--model", default=None, help="hub id or local folder (default: the bundled default model)")
    p.add_argument(
        "--limit",
        "--num-tasks",
        dest="limit",
        type=int,
        default=100,
        help="tasks 0..N-1 (fewer if the env has fewer; default 100)",
    )
    p.add_argument(
        "--num-samples",
        "--samples",
        dest="num_samples",
        type=int,
        default=1,
        help="samples per task, K: pass@k for k = 1, 2, 4, ... K and maj@K (default 1)",
    )
    p.add_argument(
        "--temperature", type=float, default=None, help="0 is greedy (default: 0 for one sample, 1.0 for several)"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="reset seed of task i is seed + i; also seeds sampling")
    p.add_argument(
        "--generator",
        choices=GENERATORS,
        default="auto",
        help="vllm, transformers, or auto: vLLM where installed and on CUDA (default: auto)",
    )
    p.add_argument("--output", type=Path, help="write one JSON line per task (with its samples) here")
    p.add_argument("--summary-json", type=Path, help="write the summary (the table's numbers) here as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    log_to_stderr()
    for flag, value in (("--limit", args.limit), ("--num-samples", args.num_samples),
                        ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        if value < 1:
            p.error(f"{flag} must be >= 1")
    temperature = args.temperature if args.temperature is not None else (0.0 if args.num_samples == 1 else 1.0)
    if temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                            seed=args.seed)  # fmt: skip
    try:
        with args.output.open("w", encoding="utf-8") if args.output else nullcontext() as out:
            result = evaluate(args.env, model=args.model, env_kwargs=args.env_kwargs, limit=args.limit,
                              num_samples=args.num_samples, params=params, seed=args.seed, output=out,
                              progress=not args.no_progress, generator_kind=args.generator)  # fmt: skip
    except (RegistryError, EngineUnavailable) as e:
        p.error(str(e))
    summary = result.summary()
    title = (
        f"env {args.env}, model {args.model or 'default'}: {summary['tasks']} tasks x {args.num_samples} "
        f"samples, temperature {temperature:g}, top-p {args.top_p:g}, max {args.max_new_tokens} new tokens"
    )
    print(format_table(summary, title))
    if args.summary_json:
        record = {"env": args.env, "model": args.model, "temperature": temperature, "top_p": args.top_p,
                  "max_new_tokens": args.max_new_tokens, "seed": args.seed, **summary}  # fmt: skip
        args.summary_json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
