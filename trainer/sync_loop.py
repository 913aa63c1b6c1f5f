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
The step itself is ``step.py``'s (``Player.play``, then ``Learning``), the run around it
``run.py``'s, the same as the pipelines call; this file holds only what is the synchronous
loop's own: one process (or a launcher's ranks) that both plays and learns.
The engines are chosen once at setup (``engines/build.py``): ``--generator transformers|vllm|auto``
and ``--learner torch|deepspeed``; with DeepSpeed under a launcher
(``deepspeed --num_gpus 2 scripts/train.py ...``) rank 0 plays the episodes and scatters
the packed batch, and every rank learns on its share (data parallel).
``--max-staleness N`` runs the same steps as two overlapping processes instead
(``pipeline/loop.py``); with N = 0 it reproduces this loop exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from rlvr.trainer.algorithm.stopwatch import Stopwatch
from rlvr.trainer.bookkeeping.evaluation import TrainingEval, training_eval
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import (
    EngineError,
    build_learner,
    choose_generator,
    learner_ranks,
    resolve_device,
    setup_process,
)
from rlvr.trainer.engines.distributed import scatter_batch, world_size
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.protocols import Learner
from rlvr.trainer.run import RunShell, TrainResult, resume_point
from rlvr.trainer.step import Learning, Player, build_envs

logger = logging.getLogger(__name__)


def train(config: TrainConfig) -> TrainResult:
    """Run GRPO as ``config`` says; return where the results are.

    Under a launcher with several learner ranks (``--learner deepspeed``), rank 0 alone
    plays the episodes, packs the batch and scatters it (each rank learns on its share);
    every rank takes the optimizer step, and rank 0 alone logs and hands the new weights
    to its generator. The calls every rank must make in the same order are marked
    "collective" below.
    """
    resume_from = resume_point(config)
    run = _setup(config)
    main = run.player is not None  # rank 0: the one rank that generates, logs and publishes
    shell = RunShell(config, run.learner, run.tokenizer, resume_from, main=main)  # collective (resume)
    if resume_from is not None:
        run.publish()  # collective
    learning = Learning(config, run.learner, run.tokenizer.pad_token_id, run.publish, share=scatter_batch)

    def step_fn(step: int) -> Any:
        watch, t0 = Stopwatch(), time.perf_counter()
        rollouts = run.player.play(step) if run.player is not None else None  # 1. P tasks x G episodes
        record = learning(step, rollouts, watch, t0)  # 2.-4. advantages, learn (collective), publish
        if record is None or rollouts is None:
            return None
        record["time/weight_sync"] = watch.seconds["publish"]
        return record, rollouts

    evaluate = None
    if run.evaluate is not None and run.player is not None:
        player, judge = run.player, run.evaluate
        evaluate = lambda: judge(player.generator, player.tokenizer, player.max_context)  # noqa: E731
    try:
        # Ctrl-C / SIGTERM: the step in progress ends and is saved (one process; a launcher's ranks stop at once)
        record, checkpoint = shell.run(step_fn, evaluate=evaluate, signals=world_size() == 1)
    finally:
        shell.close()
    return shell.result(record, checkpoint)


@dataclass
class _Run:
    """The pieces built once at setup. On learner ranks other than 0 only the learner is set."""

    tokenizer: Any
    learner: Learner
    player: Player | None = None
    evaluate: TrainingEval | None = None

    def publish(self) -> None:
        """Hand the learner's weights to the generator (collective: ZeRO-3 gathers them on every rank)."""
        weights = self.learner.weights_for_generation()
        if self.player is not None:
            self.player.generator.update_weights(weights, self.learner.version)


def _setup(config: TrainConfig) -> _Run:
    setup_process(config, config.torch_threads)
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
    learner = build_learner(config, model, device)
    if rank != 0:
        return _Run(tokenizer=tokenizer, learner=learner)
    choice = choose_generator(config.generator, device)
    logger.info("generator: %s (%s); learner: %s, %d rank(s)", choice.kind, choice.reason, config.learner, world)
    # A torch learner and the transformers generator on one device share the model object: no weight copy.
    shared = model if choice.kind == "transformers" and config.learner == "torch" else None
    player = Player.build(config, device, envs=envs, tokenizer=tokenizer, model=shared, threads=config.torch_threads)
    if shared is None:
        player.generator.version = learner.version  # its own copy of the weights the learner starts from
    return _Run(tokenizer=tokenizer, learner=learner, player=player, evaluate=training_eval(config))
