"""Evaluate a policy on an environment: mean reward and pass@1 over tasks, no training.

    python scripts/evaluate.py --env arithmetic --num-tasks 200
    python scripts/evaluate.py --env gsm8k --model runs/grpo/checkpoints/step_000020 --temperature 0

It plays tasks ``0 .. num_tasks-1`` (``options={"index": i}``) through the same rollout
code as training (``rollout.collect_rollouts``), so multi-turn environments, chat
templates and reward composition behave exactly as they do in a training run. With
``samples > 1`` each task is sampled that many times and the reward is averaged per task
(pass@1 estimated from k samples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from rlvr.envs.registry import make_env
from rlvr.trainer.default_model import load_tokenizer
from rlvr.trainer.engines import build_generator, choose_generator, model_source
from rlvr.trainer.rollout import EnvMessageRenderer, TaskRef, collect_rollouts
from rlvr.trainer.types import SamplingParams
from transformers import AutoConfig

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)

TASKS_PER_BATCH = 8
"""Tasks played per generation call: bounds memory, and moves the progress bar."""


@dataclass
class EvalResult:
    """Per-task mean rewards and what they add up to."""

    task_rewards: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_reward(self) -> float:
        return statistics.fmean(self.task_rewards.values()) if self.task_rewards else 0.0

    @property
    def solved_fraction(self) -> float:
        """Fraction of tasks whose mean reward reached 1 (every sample correct)."""
        if not self.task_rewards:
            return 0.0
        return sum(r >= 1.0 for r in self.task_rewards.values()) / len(self.task_rewards)


def evaluate(
    env: str,
    *,
    model: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    num_tasks: int = 100,
    samples: int = 1,
    params: SamplingParams = GREEDY,
    seed: int = 0,
    output: IO[str] | None = None,
    progress: bool = True,
    generator_kind: str = "auto",
) -> EvalResult:
    """Play ``num_tasks`` tasks ``samples`` times each; write one JSON line per episode to ``output``.

    ``generator_kind`` is the trainer's ``--generator`` (auto, transformers, vllm).
    """
    from tqdm import tqdm

    envs = [make_env(env, **(env_kwargs or {})) for _ in range(TASKS_PER_BATCH * samples)]
    available = getattr(envs[0].unwrapped, "num_tasks", None)
    if isinstance(available, int):
        num_tasks = min(num_tasks, available)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose_generator(generator_kind, device)
    logger.info("generator: %s (%s)", choice.kind, choice.reason)
    tokenizer = load_tokenizer(model)
    generator = build_generator(choice, model, tokenizer, device, seed=seed)
    renderer = EnvMessageRenderer(tokenizer, set(generator.eos_ids))
    max_context = int(getattr(AutoConfig.from_pretrained(model_source(model)), "max_position_embeddings", 2048))
    result, start = EvalResult(), time.perf_counter()
    with tqdm(total=num_tasks, disable=not progress, desc="evaluate", unit="task", file=sys.stderr) as bar:
        for first in range(0, num_tasks, TASKS_PER_BATCH):
            tasks = [TaskRef(index=i, seed=seed + i) for i in range(first, min(first + TASKS_PER_BATCH, num_tasks))]
            call = params if params.seed is None else dataclasses.replace(params, seed=params.seed + first)
            batch = collect_rollouts(envs[: len(tasks) * samples], generator, tokenizer, renderer, tasks, samples,
                                     call, max_context)
            for group in batch.groups:
                result.task_rewards[group[0].task_id] = statistics.fmean(e.reward for e in group)
                for e in group if output is not None else ():
                    output.write(json.dumps({"task_id": e.task_id, "reward": e.reward, "turns": e.num_turns,
                                             "completions": e.completions,
                                             "reward_components": e.reward_components}) + "\n")
            bar.update(len(tasks))
            bar.set_postfix(mean=f"{result.mean_reward:.3f}")
    result.seconds = time.perf_counter() - start
    return result
