"""Generator actors on a Ray cluster: each plays its share of every step's groups.

Actor side, :class:`GeneratorActor`: its own generator (``--generator``: transformers, or
vLLM in-process), its own copy of the model and its own environments, as the generator
process of the one-machine pipeline has (``pipeline/generator_process.py``). It owns a fixed shard
of every step: of the ``P = prompts_per_step`` groups, generator ``k`` of ``N`` plays the
``k``-th of ``N`` contiguous, nearly equal slices (:func:`shard_groups`), with the same
tasks (``TaskSchedule``) as the synchronous loop and the sampling seed
``step_seed(seed, step) + 104729 * first_group`` (:func:`shard_seed`): with one generator
that is the synchronous loop's seed, so the same samples come out.

Driver side, :class:`GeneratorPool`: creates the actors in a placement group, sends them
work (``play``: a step, the version to sample it with and a reference to those weights in
the object store), and returns finished shards as they arrive.

Invariants:

1. **Fixed shards, fixed versions.** Shard ``k`` of step ``s`` is sampled by generator
   ``k`` with the weight version the driver names (``cluster/loop.py`` picks it from the step
   alone), so what a step contains does not depend on timing, on how many shards were
   finished first, or on whether an actor was replaced.
2. **In order per actor.** An actor runs its calls one at a time in the order sent (a
   Ray actor's default); the driver never has more than ``eta + 1`` steps out.
3. **Weights by reference, or by broadcast.** With the object-store route ``play`` gets
   the weights as an ``ObjectRef`` inside a list (so Ray does not resolve it on the way
   in) and fetches them only when its version differs from the one asked for: each actor
   copies each version once. With the broadcast route (``cluster/weight_routes.py``) the actor is
   threaded, with concurrency groups ``weights`` (``join_weights``, ``receive_weights``:
   into a ring of versions) and ``control`` (``abort_weights``) beside the default one
   (``play``), each running its calls in the order sent; ``play`` gets ``[None]`` and
   waits for its version in the ring.
4. **Deaths are named, never waited on.** The driver waits on results with a timeout;
   a result of a dead actor is a ``RayActorError``, turned into a
   :class:`RayGeneratorError` naming the actor, its pid and node, and Ray's cause; with
   restarts left (``--generator-restarts``, not spent on an actor whose constructor
   failed) the actor is replaced in its bundle and every shard it held is sent again.
   An exception raised inside ``play`` (an env, a verifier) always stops the run, with
   the actor's traceback.
5. **Nothing left.** :meth:`GeneratorPool.close` kills every actor and removes the
   placement group, on every path out of the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlvr.trainer.algorithm.rollout import RolloutBatch
from rlvr.trainer.cluster.ray_runtime import Place, RayCluster, here, remote_class, require_ray
from rlvr.trainer.cluster.weight_routes import transport_device
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import choose_generator, resolve_device, setup_process
from rlvr.trainer.protocols import GeneratorError
from rlvr.trainer.step import Player, shard_groups
from rlvr.trainer.weights.broadcast import WeightReceiver

logger = logging.getLogger(__name__)

_POLL = 0.2  # seconds per wait on results: the loop checks for deaths between waits
_READY_TIMEOUT = 600.0  # seconds for an actor to load its model and environments


@dataclass
class ShardResult:
    """One generator's groups of one step, and how its time went."""

    step: int
    shard: int
    version: int
    """The weight version that sampled every episode of the shard."""
    rollouts: RolloutBatch
    """The shard's groups, ``Episode.group`` already the step-wide group index."""
    wait_seconds: float
    """The actor's idle time between its previous call and this one."""
    receive_seconds: float
    """Time spent fetching and loading new weights."""
    busy_seconds: float
    """Time spent playing the groups (sampling and environments)."""


class GeneratorActor:
    """One generator on the cluster (wrapped with ``ray.remote`` by the pool); see the module docstring."""

    def __init__(self, config: TrainConfig, shard: int, shards: int, threads: int, name: str):
        setup_process(config, threads)
        self.config, self.shard, self.name = config, shard, name
        device = resolve_device(config.device)
        if choose_generator(config.generator, device).kind == "vllm" and device.type == "cpu" and threads > 0:
            # vLLM's CPU build pins its OpenMP threads (engines.vllm_settings: cores 0..threads-1);
            # actors sharing a node would all pin to core 0, so each takes its own cores.
            first = (shard * threads) % max(1, (os.cpu_count() or 1) - threads + 1)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{first}-{first + threads - 1}")
        groups = shard_groups(config.prompts_per_step, shards)[shard]
        self.player = Player.build(config, device, groups=groups, threads=threads)  # the step core's generator side
        self.receiver = WeightReceiver()  # the broadcast route's end (cluster/weight_routes.py); unused otherwise
        self._idle_since = time.perf_counter()

    def where(self) -> Place:
        """Return where this actor runs (the pool asks once, to name it in errors)."""
        return here(self.name)

    def join_weights(self, host: str, port: int, rank: int, world: int, generation: int, cuda: bool) -> None:
        """Join the broadcast route's weight group (``weights`` concurrency group)."""
        self.receiver.join(host, port, rank, world, generation, transport_device(cuda))

    def receive_weights(self, version: int, keep_from: int) -> None:
        """Receive the next broadcast as ``version`` into the ring (``weights`` group: beside ``play``)."""
        self.receiver.receive(version, keep_from)

    def abort_weights(self) -> None:
        """End a receive in flight (``control`` group): a member of the group died."""
        self.receiver.abort()

    def play(self, step: int, weights: list[Any], version: int) -> ShardResult:
        """Play this actor's groups of ``step`` with weights ``version``.

        ``weights[0]``: the version's ObjectRef (object-store route), or None (broadcast
        route: the version is taken from the ring once received).
        """
        t0 = time.perf_counter()
        generator = self.player.generator
        if generator.version != version:
            if weights[0] is None:
                state = self.receiver.get(version)
            else:
                state = require_ray().get(weights[0])
            generator.update_weights(state, version)
        t1 = time.perf_counter()
        rollouts = self.player.play(step)  # this actor's shard of the groups, Episode.group step-wide
        t2 = time.perf_counter()
        wait, self._idle_since = t0 - self._idle_since, t2
        return ShardResult(step, self.shard, version, rollouts, wait, t1 - t0, t2 - t1)


class RayGeneratorError(GeneratorError):
    """A generator actor died, or raised; the message names the actor, its node and the cause."""

    def __init__(self, message: str, *, place: Place | None, remote_traceback: str = "", init_failed: bool = False):
        super().__init__(message, remote_traceback=remote_traceback)
        self.place = place
        self.init_failed = init_failed


@dataclass
class _Actor:
    handle: Any
    place: Place | None
    incarnation: int
    outstanding: dict[int, tuple[int, Any]] = dataclasses.field(default_factory=dict)
    """step -> (version, weights ObjectRef) of the calls sent and not yet returned."""


class GeneratorPool:
    """The driver's handle on the generator actors: create, send work, collect shards, replace, close."""

    def __init__(self, cluster: RayCluster, config: TrainConfig, threads: int, gpus: bool, threaded: bool = False):
        """``threaded``: the broadcast route's actors, which receive weights in a thread beside ``play``."""
        self.ray, self.cluster, self.config, self.threads = cluster.ray, cluster, config, threads
        self.num = config.num_generators
        self.restarts = 0
        self.on_replaced: Callable[[], None] | None = None
        """Called once a replacement is ready, before its steps are sent again (the broadcast route's rebuild)."""
        bundle = {"CPU": 1.0, "GPU": 1.0} if gpus else {"CPU": 1.0}
        self.group = cluster.place([dict(bundle) for _ in range(self.num)], "generator actors")
        # Concurrency groups of one thread each: calls within a group still run in the order sent.
        self._remote = remote_class(GeneratorActor, {"weights": 1, "control": 1} if threaded else None)
        self._gpus = gpus
        self._pending: dict[Any, tuple[int, int, int]] = {}  # result ref -> (shard, incarnation, step)
        self.actors: list[_Actor] = []
        try:
            self.actors = [self._spawn(k, 0) for k in range(self.num)]
            for k in range(self.num):
                self._locate(k)
        except BaseException:
            self.close()
            raise

    def _spawn(self, shard: int, incarnation: int) -> _Actor:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        name = f"rlvr-generator-{shard}" + (f"-restart{incarnation}" if incarnation else "")
        handle = self._remote.options(
            name=name,
            num_cpus=1,
            num_gpus=1 if self._gpus else 0,
            max_restarts=0,  # the pool replaces actors itself, so that it knows which shards to send again
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=shard),
        ).remote(self.config, shard, self.num, self.threads, name)
        return _Actor(handle, None, incarnation)

    def _locate(self, shard: int) -> None:
        """Wait for actor ``shard`` to be built (model, envs) and record where it runs."""
        actor = self.actors[shard]
        try:
            actor.place = self.ray.get(actor.handle.where.remote(), timeout=_READY_TIMEOUT)
        except self.ray.exceptions.RayActorError as e:
            raise self.died(shard, e) from None
        logger.info("ray: generator %s ready", actor.place)

    def send(self, step: int, version: int, weights: Any) -> None:
        """Send step ``step`` to every actor, to be sampled with ``version`` (``weights``: its ObjectRef)."""
        for k in range(self.num):
            self._send(k, step, version, weights)

    def _send(self, shard: int, step: int, version: int, weights: Any) -> None:
        actor = self.actors[shard]
        ref = actor.handle.play.remote(step, [weights], version)
        actor.outstanding[step] = (version, weights)
        self._pending[ref] = (shard, actor.incarnation, step)

    def receive(self) -> list[ShardResult]:
        """Return the shards finished within a short wait (maybe none); replace dead actors, or raise."""
        if not self._pending:
            raise RuntimeError("waiting for shards, but none was sent")
        ready, _ = self.ray.wait(list(self._pending), num_returns=len(self._pending), timeout=_POLL)
        results = []
        for ref in ready:
            shard, incarnation, step = self._pending.pop(ref)
            if incarnation != self.actors[shard].incarnation:
                continue  # a call to an actor already replaced: its work was sent again
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self.replace(shard, self.died(shard, e))
                continue
            except self.ray.exceptions.RayTaskError as e:
                raise self._raised(shard, step, e) from None
            del self.actors[shard].outstanding[step]
            results.append(result)
        return results

    def died(self, shard: int, error: Any) -> RayGeneratorError:
        """Return the error of actor ``shard``'s death (``error``: Ray's RayActorError), naming it."""
        actor = self.actors[shard]
        who = str(actor.place) if actor.place else f"rlvr-generator-{shard} (before it was ready)"
        cause = str(error).strip()
        return RayGeneratorError(
            f"generator actor {who} died: {cause}",
            place=actor.place,
            remote_traceback=cause if error.actor_init_failed else "",
            init_failed=error.actor_init_failed,
        )

    def _raised(self, shard: int, step: int, error: Any) -> RayGeneratorError:
        actor = self.actors[shard]
        cause = getattr(error, "cause", None) or error
        remote = str(error)  # Ray's rendering: the actor's traceback, then the exception
        return RayGeneratorError(
            f"generator actor {actor.place} raised (at step {step}): {type(cause).__name__}: {cause}\n"
            f"--- generator traceback ---\n{remote}",
            place=actor.place,
            remote_traceback=remote,
        )

    def replace(self, shard: int, error: RayGeneratorError) -> None:
        """Start a new actor for ``shard`` and send it every step the dead one held; raise if not allowed."""
        if error.init_failed or self.restarts >= self.config.generator_restarts:
            raise error
        self.restarts += 1
        old = self.actors[shard]
        logger.warning(
            "%s; replacing it and regenerating step(s) %s (restart %d of %d)",
            error, sorted(old.outstanding), self.restarts, self.config.generator_restarts,
        )  # fmt: skip
        self.ray.kill(old.handle, no_restart=True)
        self.actors[shard] = self._spawn(shard, old.incarnation + 1)
        self._locate(shard)
        if self.on_replaced is not None:
            self.on_replaced()
        for step, (version, weights) in sorted(old.outstanding.items()):
            self._send(shard, step, version, weights)

    def close(self) -> None:
        """Kill every actor and release the placement group (invariant 5)."""
        for actor in self.actors:
            try:
                self.ray.kill(actor.handle, no_restart=True)
            except Exception as e:  # noqa: BLE001 - teardown goes on for the others
                logger.warning("ray: could not kill %s: %s", actor.place, e)
        self.actors, self._pending = [], {}
        self.cluster.remove(self.group)
