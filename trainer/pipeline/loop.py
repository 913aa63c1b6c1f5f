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
   generator is the only producer of batches (``algorithm/staleness.py``, ``weights/shared_memory.py``).
2. Every wait is bounded and checks the other side (``generator_process`` invariant 3): a
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
from typing import Any

import torch

from rlvr.trainer.algorithm.staleness import Admission, RolloutBuffer, RolloutItem
from rlvr.trainer.bookkeeping.evaluation import LearnerEval
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.pipeline.generator_process import GeneratorProcess, GeneratorSpec, RolloutMessage
from rlvr.trainer.protocols import GeneratorError, Learner
from rlvr.trainer.run import RunShell, TrainResult, local_learner, resume_point, setup_driver
from rlvr.trainer.step import GeneratorSeconds, Learning, Taken, pipeline_step
from rlvr.trainer.weights.shared_memory import SharedMemoryTransport, TransportError

logger = logging.getLogger(__name__)


def train_async(config: TrainConfig) -> TrainResult:
    """Run GRPO with generation overlapped with learning, as ``config`` says (``max_staleness`` set)."""
    if config.max_staleness is None:
        raise ValueError("train_async needs config.max_staleness (0 for the synchronous schedule)")
    resume_from = resume_point(config)
    device = setup_driver(config, "in the generator process")
    refusal = "the asynchronous pipeline runs one learner rank, not {world}: drop the launcher or --max-staleness"
    learner, tokenizer = local_learner(config, device, refusal)
    shell = RunShell(config, learner, tokenizer, resume_from, desc="grpo-async", lagged=True)
    pipeline: _Pipeline | None = None
    try:
        pipeline = _Pipeline(config, learner, shell.start, shell.lagged)
        held = pipeline
        learning = Learning(config, learner, tokenizer.pad_token_id, lambda: held.publish(learner))
        evaluate = LearnerEval.build(config, learner, tokenizer)
        record, checkpoint = shell.run(
            lambda step: pipeline_step(step, held, learning),
            evaluate=(lambda: evaluate(learner)) if evaluate is not None else None,  # the learner waits meanwhile
            lagged=lambda: held.lagged(learner.version),
        )
    finally:
        if pipeline is not None:
            pipeline.close()  # invariant 3: on every path
        shell.close()
    return shell.result(record, checkpoint)


class _Pipeline:
    """The learner's handle on the generator side: transport, process, buffer, restarts.

    The transport holds the last ``eta + 1`` weight versions: the generator samples step
    ``s`` with version ``s - 1 - eta`` (a fixed lag, ``generator_process`` invariant 2)
    while the learner may already be at ``s - 1``. A fresh generator (the first, a
    restarted one, a resumed run's) finds the lagging versions it needs published before
    the current one: from the checkpoint, or from the transport of the generator it replaces.
    """

    def __init__(self, config: TrainConfig, learner: Learner, start: int, lagged: dict[int, Any]):
        self.config = config
        self.eta = config.eta
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
            config=self.config, start_step=after_step, threads=self.config.role_threads, parent_pid=os.getpid()
        )
        self.process = GeneratorProcess(self.ctx, spec, self.transport)
        # Its death while holding the transport's lock then ends a publish at once (see publish).
        self.transport.watch(lambda: self.process is not None and self.process.alive())

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def take(self, step: int, learner: Learner) -> Taken:
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
        message = self.buffer.take(step, learner.version).payload
        seconds = GeneratorSeconds(message.wait_seconds, message.receive_seconds, message.busy_seconds)
        return Taken(message.rollouts, message.version, seconds)

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
