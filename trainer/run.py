"""The run around the steps, one for every loop: resume, config file, log, progress, signals, checkpoints.

Each loop (``sync_loop.py``, ``pipeline/loop.py``, ``cluster/loop.py``) builds its pieces,
opens a ``RunShell`` and hands it a function that runs step ``s`` (``step.py``); the shell
does the rest the same way for all three:

    resume_point(config)          --resume DIR|auto|latest -> the checkpoint folder (before setup)
    RunShell(config, ...)         config.yaml, the learner (and lagged weights) restored, metrics
                                  log reopened at the resumed step, progress bar
    shell.run(step_fn, ...)       steps start+1 .. max_steps: evaluate every --eval-every, log,
                                  checkpoint every --checkpoint-every and the last; Ctrl-C or
                                  SIGTERM ends the step in progress, saves it and stops
                                  (``bookkeeping/interrupt.py``); a generator failure saves the
                                  last completed step before it goes up
    shell.result(...)             TrainResult: steps, metrics.jsonl, the final checkpoint
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.rollout import RolloutBatch
from rlvr.trainer.bookkeeping.checkpoint import load_checkpoint, load_lagged_weights, resolve_resume, save_checkpoint
from rlvr.trainer.bookkeeping.interrupt import GracefulStop
from rlvr.trainer.bookkeeping.metrics import RunLog
from rlvr.trainer.config import TrainConfig, write_config
from rlvr.trainer.engines.build import (
    EngineError,
    build_learner,
    choose_generator,
    learner_ranks,
    resolve_device,
    setup_process,
)
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.protocols import GeneratorError, Learner

logger = logging.getLogger(__name__)

StepFn = Callable[[int], "tuple[dict[str, Any], RolloutBatch] | None"]
"""Runs step ``s``; returns its record and rollouts (None on a learner rank that does not log)."""


@dataclass
class TrainResult:
    """What a training run leaves behind."""

    steps: int
    """Completed training steps (including those of a resumed run)."""
    metrics_path: Path
    """The run's metrics.jsonl."""
    checkpoint: Path
    """The final checkpoint folder."""
    last_metrics: dict[str, Any]
    """The metrics record of the last step run by this call (empty if none ran)."""


def resume_point(config: TrainConfig) -> Path | None:
    """Return the checkpoint ``--resume`` names (None without it); raise before any model loads if there is none."""
    return resolve_resume(config.resume, config.output_dir) if config.resume else None


def setup_driver(config: TrainConfig, generators: str) -> torch.device:
    """Set up a pipeline's learner process (seed, threads) and check the run before any model loads.

    A bad ``--env`` or a generator that cannot be had fails here, in seconds. ``generators``
    says where the generators run, for the log line naming the generator chosen.
    """
    setup_process(config, config.role_threads)
    make_env(config.env, **config.env_kwargs).close()
    device = resolve_device(config.device)
    choice = choose_generator(config.generator, device)  # checked here; built where the generators run
    logger.info("generator: %s (%s), %s; learner: %s", choice.kind, choice.reason, generators, config.learner)
    return device


def local_learner(config: TrainConfig, device: torch.device, refusal: str) -> tuple[Learner, Any]:
    """Load the model and build the learner in this process (one rank); return it and the tokenizer.

    A launcher with several processes is refused with ``refusal`` (formatted with ``world``):
    the pipelines place their learner ranks themselves, or run one.
    """
    _, world = learner_ranks(config, device)
    if world > 1:
        raise EngineError(refusal.format(world=world))
    model, tokenizer = load_model(config.model)
    model.to(device)
    return build_learner(config, model, device), tokenizer


class RunShell:
    """The bookkeeping of one run; ``main`` is the one process that logs (a launcher's rank 0).

    Opening it writes config.yaml (the main process), restores the learner from ``resume_from`` (collective with
    several ranks; it also restores the RNG state) and, with ``lagged``, reads the older
    weight versions a pipeline's next batches sample with.
    """

    def __init__(
        self,
        config: TrainConfig,
        learner: Learner,
        tokenizer: Any,
        resume_from: Path | None,
        *,
        main: bool = True,
        desc: str = "grpo",
        lagged: bool = False,
    ):
        self.config, self.learner, self.tokenizer, self.main = config, learner, tokenizer, main
        if main:
            write_config(config)
        self.start, self.lagged = 0, dict[int, Any]()
        if resume_from is not None:
            self.start = load_checkpoint(resume_from, learner).step  # collective
            if lagged:
                self.lagged = load_lagged_weights(resume_from)
        resume_step = self.start if resume_from is not None else None
        self.writer = None
        if main:
            self.writer = RunLog(config.output_dir, resume_step, config.samples_every, tokenizer, config=config)
        self.bar = tqdm(total=config.max_steps, initial=self.start, desc=desc, disable=not (config.progress and main),
                        file=sys.stderr)  # fmt: skip

    def run(
        self,
        step_fn: StepFn,
        *,
        evaluate: Callable[[], dict[str, float]] | None = None,
        lagged: Callable[[], dict[int, Any]] | None = None,
        signals: bool = True,
    ) -> tuple[dict[str, Any], Path | None]:
        """Run steps ``start + 1 .. max_steps``; return the last record and the last checkpoint written.

        ``evaluate`` runs every ``--eval-every`` steps after the step, its keys joining the
        record; checkpoints carry ``lagged()`` (a pipeline's older weight versions, so a
        resumed run samples what the uninterrupted one did). ``signals``: a first Ctrl-C or
        SIGTERM ends the step in progress and saves it (off under a launcher with several
        ranks, which would each note it at a different step: the checkpoint is collective).
        On a ``GeneratorError`` the last completed step is checkpointed before it goes up.
        """
        config = self.config
        record: dict[str, Any] = {}
        checkpoint, done = None, self.start

        def save(step: int) -> Path:
            held = lagged() if lagged is not None else None
            return save_checkpoint(config.output_dir, step, self.learner, self.tokenizer, config, lagged=held)

        try:
            with GracefulStop(enabled=signals) as stop:
                for step in range(self.start + 1, config.max_steps + 1):
                    out = step_fn(step)
                    done = step
                    if out is not None:
                        record = self._log(step, *out, evaluate)
                    checkpoint = stop.end_of_step(step, config.max_steps, config.checkpoint_every, save) or checkpoint
        except GeneratorError:
            if done > self.start and (checkpoint is None or not checkpoint.name.endswith(f"{done:06d}")):
                path = save(done)
                logger.error("generator failed; saved the last completed step (%d) to %s", done, path)
            raise
        return record, checkpoint

    def _log(
        self, step: int, record: dict[str, Any], rollouts: RolloutBatch, evaluate: Callable[[], dict] | None
    ) -> dict[str, Any]:
        if evaluate is not None and step % self.config.eval_every == 0:
            record |= evaluate()  # eval/pass@1, ...
        assert self.writer is not None
        self.writer.write(record, rollouts)  # metrics.jsonl, and samples.jsonl every samples_every steps
        self.bar.update(1)
        if "staleness_mean" in record:
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", stale=f"{record['staleness_mean']:.1f}")
        else:
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
        return record

    def result(self, record: dict[str, Any], checkpoint: Path | None) -> TrainResult:
        """Return what the run left; with no step left to run (resumed at max_steps) the last checkpoint stands."""
        if checkpoint is None:
            checkpoint = resolve_resume("latest", self.config.output_dir)
        metrics_path = Path(self.config.output_dir) / "metrics.jsonl"
        return TrainResult(max(self.start, self.config.max_steps), metrics_path, checkpoint, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.bar.close()
