"""Asynchronous GRPO: generation and learning at the same time, in two processes, staleness bounded.

    python scripts/train.py --env gsm8k --max-staleness 2
    python scripts/train.py --env arithmetic --max-staleness 1 --objective plain --torch-threads 2

The same steps as the synchronous loop (``sync_loop.py``: same tasks, same per-step sampling
seeds, same advantages and packing), split over two processes:

    learner process (here)                          generator process (pipeline/generator_process.py)
    step s: take batch s from the buffer            for s' = s+1 .. s+1+eta, ahead of the learner:
            advantages, pack, optimizer step          wait for weights of version >= s'-1-eta
            publish weights, version s  ──────────>   take version s'-1-eta, play the groups, send batch s'

so while the learner does step ``s`` the generator samples the batches of the steps after
it, with weights ``eta = max_staleness`` steps old when they are learned (``algorithm/staleness.py``
states and checks the bound; ``weights/shared_memory.py`` moves the weights). The lag is fixed,
not "at most": which version samples which step does not depend on timing, so a run is
reproducible, a restarted generator or a resumed run (its checkpoint carries the lagging
versions) samples exactly what the uninterrupted run did, and ``--eval-every`` evaluates
the learner's weights in this process without disturbing the schedule. Each process gets
``torch_threads // 2`` threads (at least 1): on two cores, one core per role.

The objective (``algorithm/losses.py``) is by default AReaL's decoupled one (Fu et al. 2025). With
``mu`` the policy that sampled (the generator's log-probabilities), ``pi_prox`` the
learner's weights before the step and ``pi_theta`` the weights being learned:

    rho = pi_theta / pi_prox,   w = min(pi_prox / mu, C)   (C = --is-cap, 5; or 0 beyond C: --is-mode mask)
    J   = agg_{i,t} w_{i,t} * min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)  -  beta * KL

The clip keeps the *update* proximal to the current weights, whatever their age when
sampling, and ``w`` corrects for the samples coming from an older policy. ``--objective
plain`` takes the ratio against ``mu`` instead (PPO's old policy = the sampler); with
``eta = 0`` every objective is GRPO. With one optimizer step per batch (``num_iterations
= 1``) pi_prox needs no extra forward pass: it is the detached log-probabilities of the
gradient pass itself (``engines/torch_learner.py``).

Where this departs from AReaL: the bound is kept per batch by admission (the generator
waits before starting a batch; all of a batch is sampled by one version) instead of per
request with weight updates in the middle of generation; the importance weight is
truncated at 5 by default (AReaL masks beyond an optional cap: ``--is-mode mask``) and may
be per sequence; batches sampled by the learner's current weights are not reweighted (see
``algorithm/losses.py``); weights travel through CPU shared memory, not NCCL.

Measured on ``arithmetic`` with the default model (60 steps, 8-32 prompts x 8): at
staleness 2 the decoupled objective ends 0.0-0.05 below the synchronous reward at
learning rates 2e-4 to 3e-4 (uncorrected GRPO on the same stale batches: 0.2 below); at
5e-4 to 1e-3 the tiny policy changes so much in two steps (k3 between the sampling and the
learning weights 0.1-3 per token) that staleness costs 0.05-0.1 even with the weights,
and ``plain``, whose clip stops pushing tokens that already moved since sampling, held
up better there. Staleness is a learning-rate budget: keep the per-step change small.

Invariants of the concurrent code (each module states its own in detail):

1. The learner is the only writer of weights and the only reader of batches; the
   generator is the only producer of batches (``rollout_queue``, ``weight_transport``).
2. Every wait is bounded and checks the other side (``generator_worker`` invariant 3): a
   dead or failed generator becomes a ``GeneratorError`` naming its exit code or its
   traceback, never a hang.
3. Whatever ends ``train_async`` (the last step, an exception, Ctrl-C), the generator
   process is stopped and joined before it returns or raises.
4. Checkpoints are written only between steps, when the learner's state is whole. A
   generator that dies silently is restarted up to ``generator_restarts`` times (from the
   step after the last batch received: nothing received is thrown away); otherwise the
   run stops, after checkpointing its last completed step.
5. ``max_staleness = 0`` reproduces the synchronous loop: batch ``s`` is sampled by exactly
   the weights of step ``s - 1``, with the same seeds, so the same samples come out
   (``tests/test_async_trainer.py`` compares metrics and parameters).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.advantages import SCALES, turn_advantages
from rlvr.trainer.algorithm.batch import pack_episodes
from rlvr.trainer.algorithm.losses import LossFn
from rlvr.trainer.algorithm.rollout import RolloutBatch
from rlvr.trainer.algorithm.staleness import Admission, RolloutBuffer, RolloutItem, staleness_metrics
from rlvr.trainer.bookkeeping.checkpoint import load_checkpoint, load_lagged_weights, resolve_resume, save_checkpoint
from rlvr.trainer.bookkeeping.evaluation import TrainingEval, training_eval
from rlvr.trainer.bookkeeping.interrupt import GracefulStop
from rlvr.trainer.bookkeeping.metrics import RunLog, Stopwatch
from rlvr.trainer.config import TrainConfig, write_config
from rlvr.trainer.engines.build import EngineError, build_learner, build_loss_fn, choose_generator
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.pipeline.generator_process import GeneratorError, GeneratorProcess, GeneratorSpec, RolloutMessage
from rlvr.trainer.protocols import Learner
from rlvr.trainer.sync_loop import TrainResult, learner_ranks, max_context, resolve_device, seed_everything, step_record
from rlvr.trainer.weights.shared_memory import SharedMemoryTransport, TransportError

logger = logging.getLogger(__name__)


def train_async(config: TrainConfig) -> TrainResult:
    """Run GRPO with generation overlapped with learning, as ``config`` says (``max_staleness`` set)."""
    if config.max_staleness is None:
        raise ValueError("train_async needs config.max_staleness (0 for the synchronous schedule)")
    resume_from = resolve_resume(config.resume, config.output_dir) if config.resume else None
    learner, tokenizer = _setup_learner(config)
    write_config(config)  # one learner rank (checked in _setup_learner)
    losses = _losses(config)
    start, lagged = 0, {}
    if resume_from is not None:
        start, lagged = load_checkpoint(resume_from, learner).step, load_lagged_weights(resume_from)
    bar = tqdm(total=config.max_steps, initial=start, desc="grpo-async", disable=not config.progress, file=sys.stderr)
    writer = RunLog(
        config.output_dir, start if resume_from is not None else None, config.samples_every, tokenizer, config=config
    )
    pipeline: _Pipeline | None = None
    try:
        pipeline = _Pipeline(config, learner, start, lagged)
        held = pipeline

        def step_fn(step: int) -> tuple[dict[str, Any], RolloutBatch]:
            return _train_step(config, step, held, learner, losses, tokenizer.pad_token_id)

        record, checkpoint = run_steps(
            config, learner, tokenizer, start, writer, bar, step_fn, lambda: held.lagged(learner.version)
        )
    finally:
        if pipeline is not None:
            pipeline.close()  # invariant 3: on every path
        writer.close()
        bar.close()
    if checkpoint is None:  # nothing left to run (resumed at max_steps): the last one stands
        checkpoint = resolve_resume("latest", config.output_dir)
    metrics_path = Path(config.output_dir) / "metrics.jsonl"
    return TrainResult(
        steps=max(start, config.max_steps), metrics_path=metrics_path, checkpoint=checkpoint, last_metrics=record
    )


def run_steps(
    config: TrainConfig,
    learner: Learner,
    tokenizer: Any,
    start: int,
    writer: RunLog,
    bar: Any,
    step_fn: Callable[[int], tuple[dict[str, Any], RolloutBatch]],
    lagged: Callable[[], dict[int, Any]],
) -> tuple[dict[str, Any], Path | None]:
    """Run steps ``start + 1 .. max_steps`` of a pipeline (this one, or Ray's); return the last record and checkpoint.

    Each step: ``step_fn`` learns it, ``--eval-every`` evaluates in this process, the record
    and samples are logged, and checkpoints carry ``lagged()`` (the older weight versions the
    next batches sample with). On a ``GeneratorError`` the last completed step is
    checkpointed (invariant 4) before the error goes on up; on a first Ctrl-C or SIGTERM the
    step in progress ends and is checkpointed, then ``StopSignal`` goes up (``bookkeeping/interrupt.py``).
    """
    evaluate = LearnerEval.build(config, learner, tokenizer)
    record: dict[str, Any] = {}
    checkpoint, done = None, start

    def save(step: int) -> Path:
        return save_checkpoint(config.output_dir, step, learner, tokenizer, config, lagged=lagged())

    try:
        with GracefulStop() as stop:  # Ctrl-C / SIGTERM: the step in progress ends and is saved
            for step in range(start + 1, config.max_steps + 1):
                record, rollouts = step_fn(step)
                done = step
                if evaluate is not None and step % config.eval_every == 0:
                    record |= evaluate(learner)  # eval/pass@1, ...: the learner waits, the generator runs on
                writer.write(record, rollouts)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", stale=f"{record['staleness_mean']:.1f}")
                checkpoint = stop.end_of_step(step, config.max_steps, config.checkpoint_every, save) or checkpoint
    except GeneratorError:
        if done > start and (checkpoint is None or not checkpoint.name.endswith(f"{done:06d}")):
            path = save(done)
            logger.error("generator failed; saved the last completed step (%d) to %s", done, path)
        raise
    return record, checkpoint


def role_threads(config: TrainConfig) -> int:
    """Return torch threads per process: ``torch_threads`` split between the two roles (0: torch's default)."""
    return max(1, config.torch_threads // 2) if config.torch_threads > 0 else 0


@dataclass(frozen=True)
class _Losses:
    """The objective for stale batches, and for batches sampled by the learner's own weights."""

    stale: LossFn
    on_policy: LossFn
    """mu is pi_prox: GRPO's loss bit for bit, whatever the objective (``algorithm/losses.py``)."""


def _setup_learner(config: TrainConfig) -> tuple[Learner, Any]:
    seed_everything(config.seed)
    if role_threads(config) > 0:
        torch.set_num_threads(role_threads(config))
    make_env(config.env, **config.env_kwargs).close()  # a bad --env fails before a model loads
    device = resolve_device(config.device)
    _, world = learner_ranks(config, device)
    if world > 1:
        raise EngineError(
            f"the asynchronous pipeline runs one learner rank, not {world}: drop the launcher or --max-staleness"
        )
    choice = choose_generator(config.generator, device)  # checked here; built in the generator process
    logger.info("generator: %s (%s), in the generator process; learner: %s", choice.kind, choice.reason, config.learner)
    model, tokenizer = load_model(config.model)
    model.to(device)
    learner = build_learner(config, model, device, objective=config.objective or "decoupled")
    return learner, tokenizer


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
        return cls(evaluate, generator, tokenizer, max_context(model.config), copy=own is None)

    def __call__(self, learner: Learner) -> dict[str, float]:
        if self.copy:
            self.generator.update_weights(learner.weights_for_generation(), learner.version)
        return self.evaluate(self.generator, self.tokenizer, self.max_context)


def _losses(config: TrainConfig) -> _Losses:
    return _Losses(
        stale=build_loss_fn(config, config.objective or "decoupled"),
        on_policy=build_loss_fn(config, config.objective or "decoupled", on_policy=True),
    )


def _train_step(
    config: TrainConfig, step: int, pipeline: _Pipeline, learner: Learner, losses: _Losses, pad_id: int
) -> tuple[dict[str, Any], RolloutBatch]:
    """Take batch ``step``, learn from it, publish the new weights; return the step's metrics and its rollouts."""
    watch, t0 = Stopwatch(), time.perf_counter()
    with watch.time("wait"):
        item = pipeline.take(step, learner)
    message: RolloutMessage = item.payload
    rollouts = message.rollouts
    advantages = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], SCALES[config.scale])
    batch = pack_episodes(rollouts.episodes, [a for g in advantages for a in g], pad_id, config.mask_truncated)
    staleness = [learner.version - v for e in rollouts.episodes for v in e.versions]
    # Chosen per batch among the two built at setup: a fresh batch learns with GRPO's exact numbers.
    with watch.time("learning"):
        learned = learner.step(batch, loss_fn=losses.on_policy if max(staleness) == 0 else losses.stale)
    with watch.time("publish"):
        pipeline.publish(learner)
    step_seconds = time.perf_counter() - t0
    record = step_record(step, rollouts, learned, watch.seconds["learning"], step_seconds)
    record |= staleness_metrics(staleness, config.max_staleness or 0)
    record |= pipeline_metrics(
        version=item.version,
        learner=watch.seconds,
        step_seconds=step_seconds,
        generator=GeneratorSeconds(message.wait_seconds, message.receive_seconds, message.busy_seconds),
        buffered=len(pipeline.buffer),
        restarts=pipeline.restarts,
    )
    return record, rollouts


@dataclass(frozen=True)
class GeneratorSeconds:
    """Where the generator side's time for one batch went (several generators: a summary of theirs)."""

    wait: float
    """Waiting for admissible weights: generator idle."""
    receive: float
    """Copying new weights into the engine."""
    busy: float
    """Playing the batch: sampling and environments."""


def pipeline_metrics(
    *,
    version: int,
    learner: dict[str, float],
    step_seconds: float,
    generator: GeneratorSeconds,
    buffered: int,
    restarts: int,
) -> dict[str, float]:
    """Return the pipeline's own keys of a step's metrics record; one place for both pipelines (here, Ray).

    ``learner`` holds the learner's ``wait`` (for the batch) and ``publish`` seconds of the step.
    """
    generator_seconds = generator.wait + generator.receive + generator.busy
    return {
        "policy_version": float(version),
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


class _Pipeline:
    """The learner's handle on the generator side: transport, process, buffer, restarts.

    The transport holds the last ``eta + 1`` weight versions: the generator samples step
    ``s`` with version ``s - 1 - eta`` (a fixed lag, ``generator_worker`` invariant 2)
    while the learner may already be at ``s - 1``. A fresh generator (the first, a
    restarted one, a resumed run's) finds the lagging versions it needs published before
    the current one: from the checkpoint, or from the transport of the generator it replaces.
    """

    def __init__(self, config: TrainConfig, learner: Learner, start: int, lagged: dict[int, Any]):
        self.config = config
        self.eta = config.max_staleness or 0
        self.ctx = torch.multiprocessing.get_context("spawn")
        self.buffer: RolloutBuffer[RolloutMessage] = RolloutBuffer(Admission(self.eta), start + 1)
        self.restarts = 0
        self.process: GeneratorProcess | None = None
        self._start(learner, after_step=start, lagged=lagged)

    def lagged(self, version: int) -> dict[int, dict[str, torch.Tensor]]:
        """Return copies of the held versions ``version - eta .. version - 1``: what the next batches sample with."""
        held = self.transport.held_versions()
        return {v: self.transport.snapshot(v) for v in held if version - self.eta <= v < version}

    def _start(self, learner: Learner, after_step: int, lagged: dict[int, Any]) -> None:
        # A fresh transport per process: a dead child may have left the old one's lock held.
        weights = learner.weights_for_generation()
        self.transport = SharedMemoryTransport(weights, self.ctx.Lock(), slots=self.eta + 1 if self.eta else 2)
        older = sorted(v for v in lagged if v < learner.version)
        need = max(0, after_step - self.eta)  # the version the next batch (after_step + 1) is sampled with
        if need < learner.version and need not in older:
            logger.warning(
                "no weights older than version %d to resume with (a checkpoint without lagged_weights/): "
                "the next %d batch(es) are sampled with version %d, fresher than an uninterrupted run's",
                learner.version, self.eta, learner.version,
            )  # fmt: skip
        for version in older:
            self.transport.publish(lagged[version], version)
        self.transport.publish(weights, learner.version)
        spec = GeneratorSpec(
            config=self.config, start_step=after_step, threads=role_threads(self.config), parent_pid=os.getpid()
        )
        self.process = GeneratorProcess(self.ctx, spec, self.transport)
        # Its death while holding the transport's lock then ends a publish at once (see publish).
        self.transport.watch(lambda: self.process is not None and self.process.alive())

    def take(self, step: int, learner: Learner) -> RolloutItem[RolloutMessage]:
        """Return batch ``step``, receiving batches (and restarting a dead generator) until it is here."""
        assert self.process is not None
        while not self.buffer.has(step):
            try:
                message = self.process.next_message()
            except GeneratorError as e:
                if e.reported or self.restarts >= self.config.generator_restarts:
                    raise
                self.restarts += 1
                logger.warning(
                    "%s; restarting it after step %d (restart %d of %d)",
                    e, self.buffer.last_put_step, self.restarts, self.config.generator_restarts,
                )  # fmt: skip
                self.process.stop()
                self._start(learner, after_step=self.buffer.last_put_step, lagged=self.lagged(learner.version))
                continue
            self.buffer.put(RolloutItem(message.step, message.version, message))
        return self.buffer.take(step, learner.version)

    def publish(self, learner: Learner) -> None:
        try:
            self.transport.publish(learner.weights_for_generation(), learner.version)
        except TransportError:
            if self.process is None or self.process.alive():
                raise
            # The generator died holding the transport's lock (it takes it to read weights):
            # its death is the error. The next take() reports it, or restarts the generator
            # with a fresh transport that gets these weights (``_start``).
            logger.warning("the generator died holding the weight transport's lock; version %d not published "
                           "to it", learner.version)  # fmt: skip

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
