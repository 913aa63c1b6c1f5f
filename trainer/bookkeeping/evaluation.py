"""Evaluate a policy on an environment the way papers report: pass@k, maj@k, rewards, no training.

    python scripts/evaluate.py --env arithmetic --limit 200
    python scripts/evaluate.py --env gsm8k --model runs/grpo/checkpoints/step_000020 --num-samples 16

It plays tasks ``0 .. limit-1`` (``options={"index": i}``, reset seed ``seed + i``), each
``num_samples`` times, through the same rollout code as training
(``rollout.collect_rollouts``), so multi-turn environments, chat templates and reward
composition behave exactly as they do in a training run.

A sample is *correct* when its ``correctness`` reward component (rlvr's primary one) is 1;
an environment that reports no such component counts a reward >= 1 as correct. From the
per-task counts come pass@k for every reported k (``passk.report_ks``) and maj@K on the
parsed answers (``passk.majority_vote``; reported when some sample parsed an answer).
The summary also holds the mean reward, the mean of each reward component and the mean
completion length (model tokens per episode, every turn).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.rollout import EnvMessageRenderer, Episode, TaskRef, collect_rollouts
from rlvr.trainer.bookkeeping.passk import majority_vote, pass_at_k, report_ks
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import (
    build_generator,
    choose_generator,
    max_context,
    model_config,
    prepare_generator,
    resolve_device,
)
from rlvr.trainer.engines.models import load_model, load_tokenizer
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import Generator, Learner, SamplingParams

logger = logging.getLogger(__name__)

GREEDY = SamplingParams(temperature=0.0)

EPISODES_PER_BATCH = 64
"""Episodes played per generation call (at most 8 tasks): bounds memory, and moves the progress bar."""


@dataclass
class TaskResult:
    """The samples of one task, reduced to what the summary needs."""

    task_id: str
    index: int
    rewards: list[float]
    correct: list[bool]
    parsed: list[Any]
    lengths: list[int]
    """[num_samples] model tokens of each episode."""
    components: list[dict[str, float]]

    @classmethod
    def from_group(cls, index: int, group: list[Episode]) -> TaskResult:
        return cls(
            task_id=group[0].task_id,
            index=index,
            rewards=[e.reward for e in group],
            correct=[is_correct(e) for e in group],
            parsed=[e.parsed for e in group],
            lengths=[e.num_model_tokens for e in group],
            components=[dict(e.reward_components) for e in group],
        )

    def record(self, group: list[Episode]) -> dict[str, Any]:
        """Return this task's line of the per-task JSONL file (with every sample's text)."""
        voted, maj_correct = majority_vote(self.parsed, self.correct)
        n, c = len(self.correct), sum(self.correct)
        return {
            "task_id": self.task_id,
            "index": self.index,
            "num_samples": n,
            "num_correct": c,
            "pass@k": {str(k): pass_at_k(n, c, k) for k in report_ks(n)},
            "maj_answer": _plain(voted),
            "maj_correct": maj_correct,
            "reward_mean": statistics.fmean(self.rewards),
            "samples": [
                {"completions": e.completions, "reward": e.reward, "correct": c, "parsed": _plain(e.parsed),
                 "reward_components": e.reward_components, "length": e.num_model_tokens, "turns": e.num_turns}
                for e, c in zip(group, self.correct)
            ],
        }  # fmt: skip


def is_correct(episode: Episode) -> bool:
    """Whether an episode solved its task: the correctness component, else the reward, reached 1."""
    value = episode.reward_components.get("correctness", episode.reward)
    return value >= 1.0


@dataclass
class EvalResult:
    """Every task's samples, and the numbers they add up to (``summary``)."""

    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_samples(self) -> int:
        return len(self.tasks[0].rewards) if self.tasks else 0

    def summary(self) -> dict[str, Any]:
        """Return pass@k, maj@K, mean reward, component means and completion length, as a flat dict."""
        if not self.tasks:
            return {"tasks": 0, "num_samples": 0, "seconds": self.seconds}
        n = self.num_samples
        out: dict[str, Any] = {"tasks": len(self.tasks), "num_samples": n}
        for k in report_ks(n):
            out[f"pass@{k}"] = statistics.fmean(pass_at_k(n, sum(t.correct), k) for t in self.tasks)
        if any(p is not None for t in self.tasks for p in t.parsed):
            out[f"maj@{n}"] = statistics.fmean(majority_vote(t.parsed, t.correct)[1] for t in self.tasks)
        out["reward_mean"] = statistics.fmean(r for t in self.tasks for r in t.rewards)
        components: defaultdict[str, list[float]] = defaultdict(list)
        for c in (c for t in self.tasks for c in t.components):
            for name, value in c.items():
                components[name].append(value)
        for name, values in sorted(components.items()):
            out[f"components/{name}_mean"] = statistics.fmean(values)
        out["completion_length_mean"] = statistics.fmean(x for t in self.tasks for x in t.lengths)
        out["seconds"] = self.seconds
        return out


def evaluate(
    env: str,
    *,
    model: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    limit: int = 100,
    num_samples: int = 1,
    params: SamplingParams = GREEDY,
    seed: int = 0,
    output: IO[str] | None = None,
    progress: bool = True,
    generator_kind: str = "auto",
) -> EvalResult:
    """Play ``limit`` tasks ``num_samples`` times each; write one JSON line per task to ``output``.

    ``generator_kind`` is the trainer's ``--generator`` (auto, transformers, vllm).
    """
    envs = [make_env(env, **(env_kwargs or {})) for _ in range(envs_needed(num_samples))]
    available = getattr(envs[0].unwrapped, "num_tasks", None)
    if isinstance(available, int):
        limit = min(limit, available)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = choose_generator(generator_kind, device)
    logger.info("generator: %s (%s)", choice.kind, choice.reason)
    tokenizer = load_tokenizer(model)
    generator = build_generator(choice, model, tokenizer, device, seed=seed)
    max_context = int(getattr(model_config(model), "max_position_embeddings", 2048))
    return play_tasks(envs, generator, tokenizer, max_context, list(range(limit)), num_samples, params, seed,
                      output=output, progress=progress)  # fmt: skip


def envs_needed(num_samples: int) -> int:
    """Return how many environments ``play_tasks`` plays at once for ``num_samples`` samples per task."""
    return max(1, min(8, EPISODES_PER_BATCH // num_samples)) * num_samples


def play_tasks(
    envs: list[Any],
    generator: Generator,
    tokenizer: Any,
    max_context: int,
    indices: list[int],
    num_samples: int,
    params: SamplingParams,
    seed: int,
    output: IO[str] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Play tasks ``indices`` (reset seed ``seed + index``) ``num_samples`` times each with ``generator``.

    The trainer's ``--eval-every`` calls this with its own generator (current weights);
    ``evaluate`` with one built from a model path. ``envs`` holds ``envs_needed(num_samples)``.
    """
    from tqdm import tqdm

    per_batch = len(envs) // num_samples
    renderer = EnvMessageRenderer(tokenizer, set(generator.eos_ids))
    result, start = EvalResult(), time.perf_counter()
    with tqdm(total=len(indices), disable=not progress, desc="evaluate", unit="task", file=sys.stderr) as bar:
        for first in range(0, len(indices), per_batch):
            tasks = [TaskRef(index=i, seed=seed + i) for i in indices[first : first + per_batch]]
            call = params if params.seed is None else dataclasses.replace(params, seed=params.seed + first)
            batch = collect_rollouts(envs[: len(tasks) * num_samples], generator, tokenizer, renderer, tasks,
                                     num_samples, call, max_context)  # fmt: skip
            for task, group in zip(tasks, batch.groups):
                task_result = TaskResult.from_group(task.index, group)
                result.tasks.append(task_result)
                if output is not None:
                    output.write(json.dumps(task_result.record(group)) + "\n")
            bar.update(len(tasks))
            bar.set_postfix(pass1=f"{statistics.fmean(c for t in result.tasks for c in t.correct):.3f}")
    result.seconds = time.perf_counter() - start
    return result


def format_table(summary: dict[str, Any], title: str) -> str:
    """Return the summary as a two-column console table under ``title``."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title, f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """Return ``value`` if JSON can hold it as is, else its string form (parsed answers may be any object)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


HELD_OUT_OFFSET = 10**9
"""Procedural environments evaluate tasks from this index on; training takes 0, 1, 2, ... so they never meet."""


@dataclass
class TrainingEval:
    """The ``--eval-every`` evaluation of a training run: greedy pass@1 on fixed held-out tasks."""

    envs: list[Any]
    indices: list[int]
    params: SamplingParams
    seed: int

    def __call__(self, generator: Generator, tokenizer: Any, max_context: int) -> dict[str, float]:
        """Play the tasks with the generator's current weights; return ``eval/...`` metrics for metrics.jsonl."""
        summary = play_tasks(self.envs, generator, tokenizer, max_context, self.indices, 1, self.params, self.seed)
        summary = summary.summary()
        out = {f"eval/{k}": float(v) for k, v in summary.items() if k not in ("tasks", "num_samples", "seconds")}
        out["time/eval"] = float(summary["seconds"])
        return out


def training_eval(config: Any) -> TrainingEval | None:
    """Build the evaluation of ``config`` (a ``TrainConfig``), or None when ``eval_every`` is 0.

    The environment is ``eval_env`` with ``eval_env_kwargs`` (default: the training env and
    its kwargs). A procedural one plays tasks ``HELD_OUT_OFFSET ..``, disjoint from training;
    a dataset plays its first ``eval_limit`` tasks, which are held out only when the kwargs
    name a held-out split (``{"split": "test"}``): the run logs which.
    """
    if not config.eval_every:
        return None
    name = config.eval_env or config.env
    kwargs = config.eval_env_kwargs or (config.env_kwargs if config.eval_env is None else {})
    envs = [make_env(name, **kwargs) for _ in range(envs_needed(1))]
    num_tasks = getattr(envs[0].unwrapped, "num_tasks", None)
    if isinstance(num_tasks, int):
        indices = list(range(min(config.eval_limit, num_tasks)))
        logger.info("eval: %s %s, tasks 0..%d (held out only if these kwargs name a held-out split, "
                    "e.g. --eval-env-kwargs '{\"split\": \"test\"}')", name, kwargs, len(indices) - 1)  # fmt: skip
    else:
        indices = list(range(HELD_OUT_OFFSET, HELD_OUT_OFFSET + config.eval_limit))
        logger.info("eval: %s %s, procedural tasks %d.. (disjoint from training's)", name, kwargs, HELD_OUT_OFFSET)
    params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=0.0, seed=config.seed)
    return TrainingEval(envs=envs, indices=indices, params=params, seed=config.seed)


@dataclass
class LearnerEval:
    """``--eval-every`` in the learner process: greedy pass@1 of the learner's current weights.

    The learner evaluates, not the generator process: there the weights run ``eta`` steps
    behind and the schedule of batches is fixed. It samples with rlvr's transformers loop
    on the learner's own model (torch learner: no copy) or on a copy that receives the
    learner's weights before each evaluation (DeepSpeed: the module may be partitioned).
    Greedy decoding draws no random numbers, so training is unchanged by evaluating.
    """

    evaluate: TrainingEval
    generator: TransformersGenerator
    tokenizer: Any
    max_context: int
    copy: bool

    @classmethod
    def build(cls, config: TrainConfig, learner: Learner, tokenizer: Any) -> LearnerEval | None:
        evaluate = training_eval(config)
        if evaluate is None:
            return None
        own = getattr(learner, "model", None) if config.learner == "torch" else None
        model = own if own is not None else load_model(config.model)[0]
        device = next(learner.model.parameters()).device if own is not None else resolve_device(config.device)
        generator = TransformersGenerator(model.to(device), tokenizer, device=device, seed=config.seed)
        if own is None:
            prepare_generator(generator, config, device)  # LoRA: takes what the learner publishes
        return cls(evaluate, generator, tokenizer, max_context(model.config), copy=own is None)

    def __call__(self, learner: Learner) -> dict[str, float]:
        if self.copy:
            self.generator.update_weights(learner.weights_for_generation(), learner.version)
        return self.evaluate(self.generator, self.tokenizer, self.max_context)
