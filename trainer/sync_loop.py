"""Synchronous GRPO: rollouts, advantages, loss, step -- one loop, top to bottom.

    python scripts/train.py --env arithmetic --max-steps 60
    python scripts/train.py --env gsm8k --model Qwen/Qwen2.5-0.5B-Instruct --learning-rate 1e-6

Each step samples ``P = prompts_per_step`` tasks and plays ``G = group_size`` episodes of
each (multi-turn episodes to the end), then:

    A_{i,t} = (G_{i,t} - mean_j R_j) / (std_j R_j + eps)          (algorithm/advantages.py)
    rho     = pi_theta(y) / pi_old(y)
    J       = agg_{i,t} min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
              - beta * agg_{i,t} k3(pi_theta, pi_ref)              (algorithm/losses.py)

with R_j the episode return, G_{i,t} the reward-to-go from turn t (equal to R_i when only
the final step is rewarded), ``agg`` the aggregation and k3 = pi_ref/pi - log(pi_ref/pi) - 1.
The learner takes ``num_iterations`` AdamW steps on the batch (engines/torch_learner.py), and the new
weights go to the generator.

Where this departs from the GRPO paper (Shao et al. 2024):

- the std is the population one, and the scale may be the batch std or none (Dr. GRPO);
- the clip may be asymmetric (DAPO's clip-higher) and the aggregation may be per token
  (DAPO, the default) or by a constant (Dr. GRPO) instead of per sequence;
- ``beta`` defaults to 0 (no reference model, as in DAPO and Dr. GRPO): on a CPU that
  halves the memory and saves a forward pass; set ``--beta 0.04`` for the paper's KL;
- multi-turn episodes train on every model turn, with environment messages masked out.

Strictly on-policy: the generator samples with the weights the learner has just written.
The engines are chosen once at setup (``engines/build.py``): ``--generator transformers|vllm|auto``
and ``--learner torch|deepspeed``; with DeepSpeed under a launcher
(``deepspeed --num_gpus 2 scripts/train.py ...``) rank 0 plays the episodes and scatters
the packed batch, and every rank learns on its share (data parallel).
``--max-staleness N`` runs the same steps as two overlapping processes instead
(``pipeline/loop.py``); with N = 0 it reproduces this loop exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.advantages import SCALES, turn_advantages
from rlvr.trainer.algorithm.batch import pack_episodes
from rlvr.trainer.algorithm.rollout import EnvMessageRenderer, RolloutBatch, TaskRef, collect_rollouts
from rlvr.trainer.bookkeeping.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from rlvr.trainer.bookkeeping.evaluation import TrainingEval, training_eval
from rlvr.trainer.bookkeeping.interrupt import GracefulStop
from rlvr.trainer.bookkeeping.metrics import RunLog, Stopwatch, rollout_metrics, timing_metrics
from rlvr.trainer.config import TrainConfig, write_config
from rlvr.trainer.engines.build import EngineError, build_generator, build_learner, choose_generator
from rlvr.trainer.engines.distributed import init_distributed, scatter_batch, world_size
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.protocols import Generator, Learner, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What ``train`` leaves behind."""

    steps: int
    """Completed training steps (including those of a resumed run)."""
    metrics_path: Path
    """The run's metrics.jsonl."""
    checkpoint: Path
    """The final checkpoint folder."""
    last_metrics: dict[str, Any]
    """The metrics record of the last step run by this call (empty if none ran)."""


def train(config: TrainConfig) -> TrainResult:
    """Run GRPO as ``config`` says; return where the results are.

    Under a launcher with several learner ranks (``--learner deepspeed``), rank 0 alone
    plays the episodes, packs the batch and scatters it (each rank learns on its share);
    every rank takes the optimizer step, and rank 0 alone logs and hands the new weights
    to its generator. The calls every rank must make in the same order are marked
    "collective" below.
    """
    resume_from = resolve_resume(config.resume, config.output_dir) if config.resume else None
    run = _setup(config)
    main = run.generator is not None  # rank 0: the one rank that generates, logs and publishes
    if main:
        write_config(config)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, run.learner).step  # collective
        _sync_weights(run)  # collective
    record: dict[str, Any] = {}
    checkpoint = None
    bar = tqdm(total=config.max_steps, initial=start, desc="grpo", disable=not (config.progress and main),
               file=sys.stderr)  # fmt: skip
    metrics_path = Path(config.output_dir) / "metrics.jsonl"
    resume_step = start if resume_from is not None else None
    log_args = (config.output_dir, resume_step, config.samples_every, run.tokenizer)
    writer = RunLog(*log_args, config=config) if main else None

    def save(step: int) -> Path:
        return save_checkpoint(config.output_dir, step, run.learner, run.tokenizer, config)  # collective

    try:
        # Ctrl-C / SIGTERM: the step in progress ends and is saved (one process; a launcher's ranks stop at once)
        with GracefulStop(enabled=world_size() == 1) as stop:
            for step in range(start + 1, config.max_steps + 1):
                record = _step(run, config, step, writer, bar) or record
                checkpoint = stop.end_of_step(step, config.max_steps, config.checkpoint_every, save) or checkpoint
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    if checkpoint is None:  # nothing left to run (resumed at max_steps): the last one stands
        checkpoint = resolve_resume("latest", config.output_dir)
    return TrainResult(
        steps=max(start, config.max_steps),
        metrics_path=metrics_path,
        checkpoint=checkpoint,
        last_metrics=record,
    )


def _step(run: _Run, config: TrainConfig, step: int, writer: RunLog | None, bar: Any) -> dict[str, Any] | None:
    """Play, score and learn step ``step``; return its metrics record (rank 0; None on the other ranks).

    Every rank calls it (the learner's step and the weight sync are collective); the checkpoint
    after it is too (``train``).
    """
    watch, t0 = Stopwatch(), time.perf_counter()
    batch, rollouts = None, None
    if writer is not None:
        # 1. Rollouts: P tasks x G episodes, each played to its end.
        tasks = [run.task(step, p) for p in range(config.prompts_per_step)]
        params = dataclasses.replace(run.sampling, seed=step_seed(config.seed, step))
        rollouts = collect_rollouts(
            run.envs, run.generator, run.tokenizer, run.renderer, tasks, config.group_size, params, run.max_context
        )
        # 2. Advantages: group-relative, each turn credited with its reward-to-go.
        advantages = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], SCALES[config.scale])
        batch = pack_episodes(rollouts.episodes, [a for g in advantages for a in g], run.pad_id, config.mask_truncated)
    # 3. Loss and optimizer step(s), each rank on its share of the batch (collective).
    with watch.time("learning"):
        learned = run.learner.step(scatter_batch(batch))
    # 4. The generator samples the next step with the new weights (collective).
    with watch.time("weight_sync"):
        _sync_weights(run)
    if writer is None or rollouts is None:
        return None
    # 5. Log.
    record = step_record(step, rollouts, learned, watch.seconds["learning"], time.perf_counter() - t0)
    record["time/weight_sync"] = watch.seconds["weight_sync"]
    if run.evaluate is not None and step % config.eval_every == 0:
        record |= run.evaluate(run.generator, run.tokenizer, run.max_context)  # eval/pass@1, ...
    writer.write(record, rollouts)  # metrics.jsonl, and samples.jsonl every samples_every steps
    bar.update(1)
    bar.set_postfix(reward=f"{record['reward_mean']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
    return record


def _sync_weights(run: _Run) -> None:
    """Hand the learner's weights to the generator (collective: ZeRO-3 gathers them on every rank)."""
    weights = run.learner.weights_for_generation()
    if run.generator is not None:
        run.generator.update_weights(weights, run.learner.version)


def step_record(
    step: int, rollouts: RolloutBatch, learned: dict[str, float], learning_seconds: float, step_seconds: float
) -> dict[str, Any]:
    """Return the metrics.jsonl line of one step: rollout statistics, the learner's metrics, timings."""
    stats = rollout_metrics(rollouts)
    record: dict[str, Any] = {"step": step, **stats, **learned}
    record |= timing_metrics(
        stats["generated_tokens"], rollouts.generation_seconds, rollouts.env_seconds, learning_seconds, step_seconds
    )
    return record


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


@dataclass
class _Run:
    """The pieces built once at setup. On learner ranks other than 0 only the learner is set."""

    tokenizer: Any
    learner: Learner
    envs: list[Any] = field(default_factory=list)
    generator: Generator | None = None
    renderer: EnvMessageRenderer | None = None
    task: TaskSchedule | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pad_id: int = 0
    max_context: int = 0
    evaluate: TrainingEval | None = None


def _setup(config: TrainConfig) -> _Run:
    seed_everything(config.seed)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    device = resolve_device(config.device)
    rank, world = learner_ranks(config, device)
    if world > 1 and (config.prompts_per_step * config.group_size) % world:
        raise EngineError(
            f"prompts_per_step * group_size = {config.prompts_per_step * config.group_size} episodes per step "
            f"do not split evenly over {world} learner ranks"
        )
    # Environments first: a bad --env fails before a model is loaded.
    envs = build_envs(config) if rank == 0 else []
    model, tokenizer = load_model(config.model)
    model.to(device)
    learner = build_learner(config, model, device, objective=config.objective or "grpo")
    if rank != 0:
        return _Run(tokenizer=tokenizer, learner=learner)
    choice = choose_generator(config.generator, device)
    logger.info("generator: %s (%s); learner: %s, %d rank(s)", choice.kind, choice.reason, config.learner, world)
    # A torch learner and the transformers generator on one device share the model object: no weight copy.
    shared = model if choice.kind == "transformers" and config.learner == "torch" else None
    generator = build_generator(
        choice, config.model, tokenizer, device, seed=config.seed, model=shared, threads=config.torch_threads
    )
    return _Run(
        tokenizer=tokenizer,
        learner=learner,
        envs=envs,
        generator=generator,
        renderer=EnvMessageRenderer(tokenizer, set(generator.eos_ids)),
        task=task_schedule(config, envs[0]),
        sampling=sampling_params(config),
        pad_id=tokenizer.pad_token_id,
        max_context=max_context(model.config),
        evaluate=training_eval(config),
    )


# --- pieces shared with the asynchronous pipeline (pipeline/loop.py, pipeline/generator_process.py) ---


def step_seed(seed: int, step: int) -> int:
    """Return the sampling seed of ``step``.

    A function of (seed, step) only, so resumed and asynchronous runs draw the same
    samples as an uninterrupted synchronous one.
    """
    return seed * 1_000_003 + step


def build_envs(config: TrainConfig) -> list[Any]:
    """One environment per episode of a step (``prompts_per_step * group_size``), group-major."""
    return [make_env(config.env, **config.env_kwargs) for _ in range(config.prompts_per_step * config.group_size)]


def task_schedule(config: TrainConfig, env: Any) -> TaskSchedule:
    """Return the task order of ``config`` for environments like ``env`` (finite or procedural)."""
    num_tasks = getattr(env.unwrapped, "num_tasks", None)
    return TaskSchedule(config.seed, config.prompts_per_step, num_tasks if isinstance(num_tasks, int) else None)


def sampling_params(config: TrainConfig) -> SamplingParams:
    """Return how every step samples (its seed is set per step, see ``step_seed``)."""
    return SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p)


def max_context(model_config: Any) -> int:
    """Return the context limit episodes stop growing at (multi-turn contexts grow), from a model's config."""
    return int(getattr(model_config, "max_position_embeddings", 2048))


def learner_ranks(config: TrainConfig, device: torch.device) -> tuple[int, int]:
    """Return (rank, world size) of this learner process, joining the launcher's process group.

    Only the DeepSpeed learner averages gradients over ranks; a torch learner started by a
    launcher with several processes would train each rank alone, so that is an error.
    """
    if config.learner == "deepspeed":
        return init_distributed(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise EngineError(f"{world} processes were launched, but only --learner deepspeed learns data-parallel")
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
