"""One GRPO step, written once: the generator side plays step ``s``, the learner side learns it.

The synchronous loop (``sync_loop.py``), the two-process pipeline (``pipeline/``) and the
Ray cluster (``cluster/``) are three placements of this step, not three implementations:

    generator side: Player.build(config, ...)          once per process that plays
                    Player.play(s) -> RolloutBatch     tasks of step s, its seed, G episodes each
    learner side:   Learning(config, learner, publish) once, where the learner is driven
                    Learning(s, rollouts) -> record    advantages, packing, staleness, the
                                                       learner's step, publishing, the record

A placement adds only what is its own: where the player runs (this process, a child
process, Ray actors each playing a shard of the groups) and how rollouts and weights travel.
So a feature that changes the step (an objective, a sampling rule) is written here, or in
what this module calls, and holds in all three.

What makes the placements agree number for number: the tasks of step ``s`` and its seeds
are functions of ``(seed, s)`` only (``TaskSchedule``, ``shard_seed``; with dynamic sampling
those of its extra rounds too, ``algorithm/dynamic_sampling.py``); which weights
sample step ``s`` is fixed by the staleness bound (``algorithm/staleness.py``); and a batch
sampled by the very weights being learned from takes the objective's on-policy loss, so
``--max-staleness 0`` reproduces the synchronous loop exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import AutoConfig

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.advantages import make_estimator, turn_advantages
from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.algorithm.dynamic_sampling import extra_tasks, fill_batch, learned_batch, round_seed
from rlvr.trainer.algorithm.overlong import shape_overlong
from rlvr.trainer.algorithm.rollout import EnvMessageRenderer, RolloutBatch, TaskRef, collect_rollouts
from rlvr.trainer.algorithm.staleness import staleness_metrics
from rlvr.trainer.algorithm.stopwatch import Stopwatch
from rlvr.trainer.bookkeeping.metrics import dynamic_metrics, rollout_metrics, timing_metrics
from rlvr.trainer.config import ConfigError, TrainConfig
from rlvr.trainer.engines.build import build_generator, choose_generator, max_context, model_source, prepare_generator
from rlvr.trainer.engines.distributed import world_size
from rlvr.trainer.engines.lora import LoraSettings
from rlvr.trainer.engines.models import load_tokenizer
from rlvr.trainer.protocols import Generator, Learner, SamplingParams

logger = logging.getLogger(__name__)

SHARD_SEED_STRIDE = 104_729
"""Seed offset per first group of a shard (a prime, apart from collect_rollouts' per-turn 7919)."""


# --- what step s plays: tasks and seeds, functions of (seed, step) only ----------------------


def step_seed(seed: int, step: int) -> int:
    """Return the sampling seed of ``step``.

    A function of (seed, step) only, so resumed and asynchronous runs draw the same
    samples as an uninterrupted synchronous one.
    """
    return seed * 1_000_003 + step


def shard_seed(seed: int, step: int, first_group: int) -> int:
    """Return the sampling seed of the groups of ``step`` from ``first_group`` on: ``step_seed`` for group 0."""
    return step_seed(seed, step) + SHARD_SEED_STRIDE * first_group


def shard_groups(prompts: int, shards: int) -> list[range]:
    """Split groups ``0 .. prompts - 1`` into ``shards`` contiguous slices, the first ones one longer."""
    if not 1 <= shards <= prompts:
        raise ValueError(f"cannot split {prompts} groups over {shards} generators")
    size, extra = divmod(prompts, shards)
    starts = [k * size + min(k, extra) for k in range(shards + 1)]
    return [range(starts[k], starts[k + 1]) for k in range(shards)]


class TaskSchedule:
    """Which task each group plays.

    A function of (seed, step) only, so a resumed run plays the same tasks as an
    uninterrupted one.
    Finite datasets are walked in a fresh shuffle each epoch; procedural environments
    (``num_tasks`` None) take tasks 0, 1, 2, ... in order.
    """

    def __init__(self, seed: int, prompts_per_step: int, num_tasks: int | None):
        self.seed, self.prompts_per_step, self.num_tasks = seed, prompts_per_step, num_tasks
        self._epoch, self._order = -1, list[int]()

    def __call__(self, step: int, p: int) -> TaskRef:
        cursor = (step - 1) * self.prompts_per_step + p
        if self.num_tasks is None:
            return TaskRef(index=cursor, seed=self.seed + cursor)
        epoch, offset = divmod(cursor, self.num_tasks)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, list(range(self.num_tasks))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
        return TaskRef(index=self._order[offset], seed=self.seed + cursor)


def task_schedule(config: TrainConfig, env: Any) -> TaskSchedule:
    """Return the task order of ``config`` for environments like ``env`` (finite or procedural)."""
    num_tasks = getattr(env.unwrapped, "num_tasks", None)
    return TaskSchedule(config.seed, config.prompts_per_step, num_tasks if isinstance(num_tasks, int) else None)


def build_envs(config: TrainConfig, groups: int | None = None) -> list[Any]:
    """One environment per episode of ``groups`` groups (default: the whole step), group-major."""
    groups = config.prompts_per_step if groups is None else groups
    return [make_env(config.env, **config.env_kwargs) for _ in range(groups * config.group_size)]


def sampling_params(config: TrainConfig) -> SamplingParams:
    """Return how every step samples (its seed is set per step, see ``step_seed``)."""
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p)


# --- the generator side ----------------------------------------------------------------------


@dataclass
class Player:
    """What plays, built once per process that generates; ``play(s)`` plays its groups of step ``s``.

    ``groups`` is the slice of each step's ``prompts_per_step`` groups this player plays: all
    of them in the synchronous loop and the pipeline's generator process, a shard on each
    Ray generator actor (``shard_groups``).
    """

    config: TrainConfig
    groups: range
    envs: list[Any]
    schedule: TaskSchedule
    tokenizer: Any
    generator: Generator
    renderer: EnvMessageRenderer
    sampling: SamplingParams
    max_context: int

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        device: torch.device,
        *,
        groups: range | None = None,
        envs: list[Any] | None = None,
        tokenizer: Any = None,
        model: torch.nn.Module | None = None,
        threads: int = 0,
    ) -> Player:
        """Build the envs, task schedule, tokenizer, generator (``--generator``) and sampling of ``config``.

        ``model``: sample from this very module (the synchronous loop shares the torch
        learner's model: no weight copy), whose weights are current. Without it the
        generator loads its own copy and holds version -1 until it receives weights, so
        the loaded weights never sample. ``threads``: CPU threads the process may use.
        """
        groups = range(config.prompts_per_step) if groups is None else groups
        envs = build_envs(config, len(groups)) if envs is None else envs
        tokenizer = load_tokenizer(config.model) if tokenizer is None else tokenizer
        choice = choose_generator(config.generator, device)
        generator = build_generator(
            choice, config.model, tokenizer, device, seed=config.seed, model=model, threads=threads,
            lora=LoraSettings.of(config) if model is None else None,
        )  # fmt: skip
        if model is None:
            prepare_generator(generator, config, device)  # LoRA: the learner's adapters, to be taken in place
            generator.version = -1  # nothing received yet: the loaded weights are never used
        model_config = model.config if model is not None else AutoConfig.from_pretrained(model_source(config.model))
        return cls(
            config=config,
            groups=groups,
            envs=envs,
            schedule=task_schedule(config, envs[0]),
            tokenizer=tokenizer,
            generator=generator,
            renderer=EnvMessageRenderer(tokenizer, set(generator.eos_ids)),
            sampling=sampling_params(config),
            max_context=max_context(model_config),
        )

    def play(self, step: int) -> RolloutBatch:
        """Play this player's groups of ``step`` with the generator's current weights, each episode to its end.

        With ``--dynamic-sampling``, extra rounds until as many of its groups are informative
        (``algorithm/dynamic_sampling.py``): each player fills its own quota, so a Ray shard
        does not wait for the others.
        """
        config = self.config
        tasks = [self.schedule(step, p) for p in self.groups]
        rollouts = self._play_round(step, 0, tasks)
        if config.dynamic_sampling:
            first, size, num_tasks = self.groups.start, len(self.groups), self.schedule.num_tasks

            def tasks_of(round_: int, played: frozenset[int]) -> list[TaskRef]:
                return extra_tasks(config.seed, step, round_, first, size, config.prompts_per_step, num_tasks, played)

            play = functools.partial(self._play_round, step)
            rollouts = fill_batch(rollouts, tasks, config.max_sampling_rounds, tasks_of, play)
        for episode in rollouts.episodes:
            episode.group += self.groups.start  # the step-wide group index (a shard starts past 0)
        return rollouts

    def _play_round(self, step: int, round_: int, tasks: list[TaskRef]) -> RolloutBatch:
        """Play ``tasks`` with the seed of round ``round_`` of ``step`` (round 0: the step's own), rewards shaped."""
        config = self.config
        seed = round_seed(shard_seed(config.seed, step, self.groups.start), round_)
        params = dataclasses.replace(self.sampling, seed=seed)
        rollouts = collect_rollouts(
            self.envs, self.generator, self.tokenizer, self.renderer, tasks, config.group_size, params,
            self.max_context,
        )  # fmt: skip
        if config.overlong_buffer:  # DAPO's soft overlong punishment, before anything reads the rewards
            shape_overlong(rollouts.episodes, config.max_new_tokens, config.overlong_buffer, config.overlong_penalty)
        return rollouts


# --- the learner side ------------------------------------------------------------------------


def step_record(
    step: int, rollouts: RolloutBatch, learned: dict[str, float], learning_seconds: float, step_seconds: float
) -> dict[str, Any]:
    """Return the metrics.jsonl line of one step: rollout statistics, the learner's metrics, timings."""
    stats = rollout_metrics(rollouts)
    if rollouts.played is not None:  # dynamic sampling: the step generated the dropped groups too
        stats["generated_tokens"] = float(rollouts.played.tokens)
    record: dict[str, Any] = {"step": step, **stats, **learned}
    record |= timing_metrics(
        stats["generated_tokens"], rollouts.generation_seconds, rollouts.env_seconds, learning_seconds, step_seconds
    )
    return record


class Learning:
    """The learner side of a step: advantages, packing, staleness, the learner's step, publishing, the record.

    ``publish`` hands the new weights to whoever generates next (collective where the learner
    has several ranks). ``share`` gives a learner rank its part of the packed batch: the
    identity, or ``engines.distributed.scatter_batch`` under a launcher, where only rank 0
    holds rollouts and the other ranks pass None (every batch of the synchronous loop is
    on-policy, so they know its kind).
    """

    def __init__(
        self,
        config: TrainConfig,
        learner: Learner,
        pad_id: int,
        publish: Callable[[], None],
        share: Callable[[TrainBatch | None], TrainBatch] | None = None,
    ):
        self.config, self.learner, self.pad_id, self.publish = config, learner, pad_id, publish
        self.share = share if share is not None else _whole
        self.estimator = make_estimator(config.advantage_estimator, config.scale)
        ranks = max(config.learner_ranks, world_size())
        if config.dynamic_sampling and ranks > 1 and config.group_size % ranks:
            # A step short of informative groups learns fewer of them: only whole groups of a
            # size the ranks divide always split evenly over them (TrainBatch.shard).
            raise ConfigError(
                f"--dynamic-sampling with {ranks} learner ranks needs group_size ({config.group_size}) "
                f"to be a multiple of {ranks}: a step may learn fewer groups than prompts_per_step"
            )

    def __call__(self, step: int, rollouts: RolloutBatch | None, watch: Stopwatch, t0: float) -> dict[str, Any] | None:
        """Learn step ``step`` from ``rollouts`` and publish; return its record (None on a rank without rollouts).

        ``t0``: when the step began, for ``time/step``; ``watch`` gets ``learning`` and ``publish``.
        """
        config, learner = self.config, self.learner
        batch, staleness, dynamic = None, [0], dict[str, float]()
        if rollouts is not None:
            if rollouts.played is not None:
                rollouts, dynamic = self._informative(step, rollouts)
            advantages = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], self.estimator)
            batch = pack_episodes(
                rollouts.episodes, [a for g in advantages for a in g], self.pad_id, config.mask_truncated
            )
            staleness = [learner.version - v for e in rollouts.episodes for v in e.versions]
        # Sampled by the weights being learned: the objective's on-policy loss (GRPO's, bit for bit).
        with watch.time("learning"):
            learned = learner.step(self.share(batch), on_policy=max(staleness) == 0)
        with watch.time("publish"):
            self.publish()
        if rollouts is None:
            return None
        record = step_record(step, rollouts, learned, watch.seconds["learning"], time.perf_counter() - t0)
        record |= dynamic
        if config.pipelined:
            record |= staleness_metrics(staleness, config.eta)
        return record

    @staticmethod
    def _informative(step: int, rollouts: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
        """Dynamic sampling's learner side: the informative groups (or all, if none is), and the ``dynamic/*`` keys."""
        assert rollouts.played is not None
        learned, informative = learned_batch(rollouts)
        metrics = dynamic_metrics(rollouts.played, len(learned.groups), informative)
        if metrics["dynamic/groups_short"]:
            logger.warning(
                "step %d: %d of %d groups informative after %d extra sampling round(s); learning from %s",
                step, informative, rollouts.played.quota, rollouts.played.rounds,
                "those" if informative else "the zero-spread groups (no policy gradient)",
            )  # fmt: skip
        return learned, metrics


def _whole(batch: TrainBatch | None) -> TrainBatch:
    assert batch is not None, "a learner without a share function needs the rollouts"
    return batch


# --- a pipeline's step: the learner side fed by generators elsewhere -------------------------


@dataclass(frozen=True)
class GeneratorSeconds:
    """Where the generator side's time for one batch went (several generators: a summary of theirs)."""

    wait: float
    """Waiting for admissible weights: generator idle."""
    receive: float
    """Copying new weights into the engine."""
    busy: float
    """Playing the batch: sampling and environments."""


@dataclass
class Taken:
    """A batch a pipeline hands the learner: its rollouts, who sampled them, and the generators' time."""

    rollouts: RolloutBatch
    version: int
    """The weight version that sampled the batch (the oldest, if its shards differ)."""
    generator: GeneratorSeconds
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """Keys of the pipeline's own, added to the step's record (``ray/num_generators``)."""


class BatchSource(Protocol):
    """The learner's handle on a pipeline's generators (``pipeline/loop.py``, ``cluster/loop.py``)."""

    buffered: int
    """Batches received and not yet learned."""
    restarts: int
    """Generators restarted so far."""

    def take(self, step: int, learner: Learner) -> Taken:
        """Return batch ``step`` once it is whole, restarting dead generators as allowed."""
        ...

    def publish(self, learner: Learner) -> None:
        """Hand the learner's new weights to the generators, as its version."""
        ...


def pipeline_step(step: int, source: BatchSource, learning: Learning) -> tuple[dict[str, Any], RolloutBatch]:
    """One step of a pipeline: take batch ``step`` from ``source``, learn it, publish; return record and rollouts."""
    watch, t0 = Stopwatch(), time.perf_counter()
    with watch.time("wait"):
        taken = source.take(step, learning.learner)
    record = learning(step, taken.rollouts, watch, t0)
    assert record is not None
    record |= pipeline_metrics(taken, watch.seconds, record["time/step"], source.buffered, source.restarts)
    return record | taken.extra, taken.rollouts


def pipeline_metrics(
    taken: Taken, learner: dict[str, float], step_seconds: float, buffered: int, restarts: int
) -> dict[str, float]:
    """Return the pipelines' own keys of a step's record.

    ``learner`` holds the learner's ``wait`` (for the batch) and ``publish`` seconds of the step.
    """
    generator = taken.generator
    generator_seconds = generator.wait + generator.receive + generator.busy
    return {
        "policy_version": float(taken.version),
        "time/wait_rollouts": learner["wait"],
        "time/weight_publish": learner["publish"],
        "time/weight_receive": generator.receive,
        "time/generator_wait": generator.wait,
        "time/generator_busy": generator.busy,
        "async/learner_idle_fraction": learner["wait"] / max(step_seconds, 1e-9),
        "async/generator_idle_fraction": generator.wait / max(generator_seconds, 1e-9),
        "async/buffered_batches": float(buffered),
        "async/generator_restarts": float(restarts),
    }
