"""Asynchronous GRPO on a Ray cluster: several generator actors feed the learner (``--cluster ray``).

    python scripts/train.py --env arithmetic --cluster ray --num-generators 2 --max-staleness 1
    python scripts/train.py --env gsm8k --cluster ray --ray-address auto --num-generators 8 --max-staleness 2

The same steps, objective and staleness bound as the one-machine pipeline
(``pipeline/loop.py``), with the generator process replaced by ``N = num_generators``
Ray actors (``cluster/generator_actors.py``) and the shared-memory transport by Ray's object store:

    driver (here: the learner)                         generator actors k = 0 .. N-1
    after step s-1: publish weights v = s-1            play(step, [ref of v(step) | None], v(step)):
      (object store, or broadcast to every actor)        fetch v(step) (store) or wait for it in
    send every admissible step d <= s + eta ───────>     the ring (broadcast), play shard k
    wait until all N shards of step s are in  <───────   return the shard (through the store)
    advantages over the whole batch, pack, learn step s

Which weights sample which step is fixed: step ``s`` is sampled by version
``max(0, s - 1 - eta)`` (the oldest admissible, ``algorithm/staleness.Admission``), by every
shard alike, so the batches do not depend on how fast each actor is, and with
``max_staleness = 0`` and one generator the run is the synchronous loop (same tasks, same
seeds, same weights: ``tests/test_ray_trainer.py`` compares the metrics). A checkpoint
carries the ``eta`` older versions the next batches sample with (``bookkeeping/checkpoint.py``), so a
resumed run samples what the uninterrupted one would have. The groups of a step are split
in fixed contiguous shards, one per actor, each with its own sampling seed
(``step.shard_seed``); a batch is learned only when every shard is in, and the
advantages are computed over the whole batch as in the synchronous loop (group-relative,
so a shard boundary changes nothing).

The loss is the decoupled objective chosen per batch as in ``pipeline/loop.py``: GRPO's
exact loss for batches sampled by the learner's current weights, the importance-weighted
one for stale batches.

Where this departs from the one-machine pipeline: weights reach the actors by the route
``--weight-sync`` names (``cluster/weight_routes.py``): through the object store (one ``ray.put``
per version, one copy per actor and version), or broadcast by the learner's rank 0 over a
weight group of its own with the actors (``weights/broadcast.py``: NCCL on GPUs, gloo on CPUs).
The learner runs in the driver process, or with ``--learner-ranks M`` (DeepSpeed) as ``M``
rank actors driven from here (``cluster/learner_actors.py``): the driver packs each batch and sends
every rank its shard, and rank 0's gathered weights go to the store, or out on the
broadcast, directly.

Invariants of the concurrent code:

1. The driver is the only writer of weights and the only reader of shards; each actor
   produces only its own shard of each step, in the order the steps were sent.
2. At most ``eta + 1`` steps are out at once: a step is sent only when its sampling
   version is published, and the learner takes steps in order (``RolloutBuffer`` checks
   the bound and the order, and refuses a batch too stale).
3. Every wait is bounded (``GeneratorPool.receive`` waits 0.2 s at a time): a dead actor
   is replaced up to ``generator_restarts`` times, its shards sent again with the same
   version (so the batch is the one it would have been), or the run stops with a
   ``RayGeneratorError`` naming the actor, its node and the cause.
4. Whatever ends ``train_ray`` (the last step, an exception, Ctrl-C), the actors are
   killed and the placement group removed, and a Ray this run started is shut down,
   before it returns or raises. A generator failure first checkpoints the last
   completed step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlvr.trainer.algorithm.rollout import RolloutBatch
from rlvr.trainer.algorithm.staleness import Admission, RolloutBuffer, RolloutItem
from rlvr.trainer.bookkeeping.evaluation import LearnerEval
from rlvr.trainer.cluster.ray_runtime import RayCluster, require_ray
from rlvr.trainer.cluster.weight_routes import choose_route, make_route
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import model_source, resolve_device
from rlvr.trainer.engines.models import load_tokenizer
from rlvr.trainer.protocols import Learner
from rlvr.trainer.run import RunShell, TrainResult, local_learner, resume_point, setup_driver
from rlvr.trainer.step import GeneratorSeconds, Learning, Taken, pipeline_step

logger = logging.getLogger(__name__)


def train_ray(config: TrainConfig) -> TrainResult:
    """Run asynchronous GRPO with ``config.num_generators`` generator actors on a Ray cluster."""
    require_ray()  # a usage error before any model loads
    resume_from = resume_point(config)
    tokenizer, local = _setup_driver(config)
    run = _Session()
    try:
        run.cluster = RayCluster(config.ray_address, _cpus(config), _object_store_bytes(config))
        learner = local if local is not None else run.learner_group(config)
        shell = run.shell = RunShell(config, learner, tokenizer, resume_from, desc="grpo-ray", lagged=True)
        pipeline = run.pipeline = _RayPipeline(run.cluster, config, learner, shell.start, shell.lagged)
        learning = Learning(config, learner, tokenizer.pad_token_id, lambda: pipeline.publish(learner))
        evaluate = LearnerEval.build(config, learner, tokenizer)
        record, checkpoint = shell.run(
            lambda step: pipeline_step(step, pipeline, learning),
            evaluate=(lambda: evaluate(learner)) if evaluate is not None else None,
            lagged=pipeline.lagged,
        )
    finally:
        run.close()  # invariant 4: on every path
    return shell.result(record, checkpoint)


@dataclass
class _Session:
    """What a run holds on the cluster, released together by ``close``."""

    cluster: RayCluster | None = None
    group: Any = None
    """The ``RayLearnerGroup`` with --learner-ranks > 1."""
    pipeline: _RayPipeline | None = None
    shell: RunShell | None = None

    def learner_group(self, config: TrainConfig) -> Learner:
        from rlvr.trainer.cluster.learner_actors import RayLearnerGroup  # imports Ray: only here

        assert self.cluster is not None
        gpus = _gpus(config, self.cluster)
        threaded = choose_route(config, gpus) == "broadcast"
        self.group = RayLearnerGroup(self.cluster, config, config.role_threads, gpus, threaded)
        return self.group

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        if self.group is not None:
            self.group.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.shell is not None:
            self.shell.close()


def _setup_driver(config: TrainConfig) -> tuple[Any, Learner | None]:
    """Check the run, load the tokenizer; build the learner here unless it is a group of rank actors."""
    device = setup_driver(config, f"in {config.num_generators} Ray actor(s)")
    if config.learner_ranks > 1:
        logger.info("learner: %s, %d Ray actor ranks", config.learner, config.learner_ranks)
        return load_tokenizer(config.model), None
    refusal = (
        "--cluster ray places its learner ranks itself (--learner-ranks), not under a launcher ({world} processes)"
    )
    learner, tokenizer = local_learner(config, device, refusal)
    return tokenizer, learner


def _cpus(config: TrainConfig) -> int:
    """Logical CPUs the run's actors ask for: one per generator and per learner rank actor."""
    return config.num_generators + (config.learner_ranks if config.learner_ranks > 1 else 0)


def _gpus(config: TrainConfig, cluster: RayCluster) -> bool:
    """Whether the actors take a GPU each: the run's device is CUDA and the cluster has one for every actor."""
    return resolve_device(config.device).type == "cuda" and cluster.gpus() >= _cpus(config)


def _object_store_bytes(config: TrainConfig) -> int:
    """Object store a local Ray needs: ``eta + 3`` weight versions (fp32, counted on a meta-device model), rollouts."""
    model_config = AutoConfig.from_pretrained(model_source(config.model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    weights = sum(p.numel() * 4 for p in model.parameters())
    return (config.eta + 3) * weights + 64 * 2**20


@dataclass
class _Step:
    """The shards of one step, put together: the batch and what each actor's time went to."""

    rollouts: RolloutBatch
    wait_seconds: list[float]
    receive_seconds: list[float]
    busy_seconds: list[float]


class _RayPipeline:
    """The learner's side: weight versions in the object store, steps sent, shards gathered into batches."""

    def __init__(self, cluster: RayCluster, config: TrainConfig, learner: Learner, start: int, lagged: dict):
        from rlvr.trainer.cluster.generator_actors import GeneratorPool  # imports Ray: only here, after require_ray

        self.ray, self.config = cluster.ray, config
        self.admission = Admission(config.eta)
        self.buffer: RolloutBuffer[_Step] = RolloutBuffer(self.admission, start + 1)
        self.partial: dict[int, dict[int, Any]] = {}  # step -> shard -> ShardResult
        self.next_send = start + 1
        gpus = _gpus(config, cluster)
        kind = choose_route(config, gpus)
        self.pool = GeneratorPool(cluster, config, config.role_threads, gpus, threaded=kind == "broadcast")
        self.version = learner.version
        try:
            self.route = make_route(kind, self.ray, self.pool, learner, gpus)
            logger.info("ray: weights reach the generators by %s", self.route.name)
            # A resumed run's older versions, from its checkpoint.
            self.route.seed({v: w for v, w in lagged.items() if v < learner.version})
            self.publish(learner)
        except BaseException:
            self.pool.close()  # the session holds no pipeline yet: close the actors here
            raise

    def publish(self, learner: Learner) -> None:
        """Hand the learner's weights to the generators as its version; send the steps they admit."""
        self.version = learner.version
        oldest = self.admission.min_version(self.buffer.next_step)  # no step still to learn needs older
        self.route.publish(learner, min(oldest, learner.version))
        while self.next_send <= self.config.max_steps:
            version = self._version_for(self.next_send)
            if version is None:
                break
            self.pool.send(self.next_send, version, self.route.argument(version))
            self.next_send += 1

    def lagged(self) -> dict[int, Any]:
        """Return the older versions the next steps are sampled with, for the checkpoint (exact resume)."""
        eta = self.admission.max_staleness
        held = sorted(v for v in self.route.versions() if self.version - eta <= v < self.version)
        return self.route.states(held)

    def _version_for(self, step: int) -> int | None:
        """Return the oldest held version that may sample ``step`` (exactly ``step - 1 - eta`` unless resumed)."""
        admitted = [v for v in self.route.versions() if self.admission.admits(step, v)]
        return min(admitted) if admitted else None

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def take(self, step: int, learner: Learner) -> Taken:
        """Return the batch of ``step``, gathering shards (and replacing dead actors) until it is whole."""
        while not self.buffer.has(step):
            for result in self.pool.receive():
                shards = self.partial.setdefault(result.step, {})
                shards[result.shard] = result
                if len(shards) == self.pool.num:
                    self._complete(result.step)
        item = self.buffer.take(step, learner.version)
        step_shards: _Step = item.payload
        n = len(step_shards.busy_seconds)
        # The generators' times: the mean wait and busy time of the actors, the slowest weight receive.
        wait, busy = sum(step_shards.wait_seconds) / n, sum(step_shards.busy_seconds) / n
        times = GeneratorSeconds(wait, max(step_shards.receive_seconds), busy)
        return Taken(step_shards.rollouts, item.version, times, {"ray/num_generators": float(n)})

    def _complete(self, step: int) -> None:
        results = [r for _, r in sorted(self.partial.pop(step).items())]
        rollouts = RolloutBatch.merge([r.rollouts for r in results])  # the shards ran side by side
        payload = _Step(
            rollouts,
            [r.wait_seconds for r in results],
            [r.receive_seconds for r in results],
            [r.busy_seconds for r in results],
        )
        self.buffer.put(RolloutItem(step, min(r.version for r in results), payload))

    def close(self) -> None:
        self.route.close()
        self.pool.close()
