"""Evaluate a model on an environment: mean reward and solved fraction, no training.

    python scripts/evaluate.py --env arithmetic --num-tasks 200 [--model PATH_OR_HUB_ID]
        [--samples K] [--temperature T] [--max-new-tokens N] [--output episodes.jsonl]

With no --model it evaluates the bundled default model; a training checkpoint folder
(runs/.../checkpoints/step_000020) works as --model. Greedy by default (--temperature 0).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from rlvr.envs.registry import RegistryError
from rlvr.trainer.config import GENERATORS, json_object_arg
from rlvr.trainer.engines import EngineUnavailable
from rlvr.trainer.evaluation import evaluate
from rlvr.trainer.metrics import log_to_stderr
from rlvr.trainer.types import SamplingParams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mean reward of a model on an rlvr environment")
    p.add_argument("--env", required=True, help="short name, gymnasium id, module:Class or file.py:Class")
    p.add_argument("--env-kwargs", type=json_object_arg, default={}, help="JSON object of env arguments")
    p.add_argument("--model", default=None, help="hub id or local folder (default: the bundled default model)")
    p.add_argument("--num-tasks", type=int, default=100, help="tasks 0..N-1 (fewer if the env has fewer)")
    p.add_argument("--samples", type=int, default=1, help="samples per task; rewards are averaged per task")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generator", choices=GENERATORS, default="auto",
                   help="vllm, transformers, or auto: vLLM where installed and on CUDA (default: auto)")
    p.add_argument("--output", type=Path, help="write one JSON line per episode here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log_to_stderr()
    for name in ("num_tasks", "samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    try:
        with args.output.open("w", encoding="utf-8") if args.output else nullcontext() as out:
            result = evaluate(args.env, model=args.model, env_kwargs=args.env_kwargs, num_tasks=args.num_tasks,
                              samples=args.samples, params=params, seed=args.seed, output=out,
                              progress=not args.no_progress, generator_kind=args.generator)
    except (RegistryError, EngineUnavailable) as e:
        p.error(str(e))
    print(f"env {args.env}: {len(result.task_rewards)} tasks x {args.samples} samples, "
          f"mean reward {result.mean_reward:.4f}, solved {result.solved_fraction:.2%}, {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
