"""How each weight version reaches the generator actors on a Ray cluster (``--weight-sync``).

Two routes behind one interface for ``cluster/loop._RayPipeline``:

* :class:`ObjectStoreRoute`: one ``ray.put`` per version (a rank group puts rank 0's
  copy from rank 0 itself); ``play`` gets the reference and an actor fetches a version the
  first time it samples with it. Works anywhere Ray does; the weights cross the host and
  are pickled once per actor and version.
* :class:`BroadcastRoute`: the learner's rank 0 and the ``N`` actors form a weight group
  (``weights/broadcast.py``: NCCL where each holds a GPU, gloo otherwise) and each version is
  broadcast to every actor as it is published, into a ring of the versions its next steps
  sample with (``GeneratorActor.receive_weights``, in a concurrency group of its own, so
  that an actor receives while it samples); ``play`` gets no reference and waits for the
  version it names.

:func:`choose_route` resolves ``auto``: the broadcast where the actors hold GPUs and the
learner is a rank group (its rank 0 then holds a GPU of its own; NCCL allows one member
per GPU, and a learner in the driver process may share a GPU with an actor), the object
store otherwise.

Invariants of the broadcast route:

1. **Same order everywhere.** The driver issues, for every version, the actors'
   ``receive_weights`` and then rank 0's send; each side runs them in that order (one
   thread per concurrency group), so the ``k``-th broadcast is the ``k``-th receive.
2. **A death costs a rebuild, not a hang.** Every wait polls the calls a fraction of a
   second at a time; when an actor dies mid-broadcast, rank 0 and the survivors are
   aborted (``WeightGroup.abort``), the dead actor is replaced (``GeneratorPool.replace``,
   within ``--generator-restarts``), and the group is rebuilt as a new generation with
   every member; rank 0 then sends every held version again, so the replacement holds
   what its re-sent steps sample with. A replacement found while collecting shards
   triggers the same rebuild (``GeneratorPool.on_replaced``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import torch

from rlvr.trainer.config import TrainConfig
from rlvr.trainer.weights.broadcast import WeightSender, prune

logger = logging.getLogger(__name__)

_POLL = 0.05
_ABORT_GRACE = 60.0  # seconds for the members of an aborted broadcast to return
_SYNC_TIMEOUT = 600.0  # seconds for a broadcast (or a rendezvous) of the whole group


def choose_route(config: TrainConfig, gpus: bool) -> str:
    """Resolve ``--weight-sync`` (see the module docstring for ``auto``)."""
    if config.weight_sync != "auto":
        return config.weight_sync
    return "broadcast" if gpus and config.learner_ranks > 1 else "object-store"


class ObjectStoreRoute:
    """Each version put once in the object store; actors fetch the versions they sample with."""

    name = "object-store"

    def __init__(self, ray: Any):
        self.ray = ray
        self.refs: dict[int, Any] = {}

    def seed(self, lagged: dict[int, dict[str, torch.Tensor]]) -> None:
        """Hold a resumed run's older versions (from its checkpoint)."""
        for version, state in lagged.items():
            self.refs[version] = self.ray.put(state)

    def publish(self, learner: Any, keep_from: int) -> None:
        put = getattr(learner, "weights_ref", None)  # a rank group puts rank 0's copy itself
        self.refs[learner.version] = put() if put is not None else self.ray.put(learner.weights_for_generation())
        prune(self.refs, keep_from, learner.version)

    def versions(self) -> set[int]:
        return set(self.refs)

    def argument(self, version: int) -> Any:
        """Return what ``play`` gets for ``version``: its reference."""
        return self.refs[version]

    def states(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return {v: self.ray.get(self.refs[v]) for v in versions}

    def close(self) -> None:
        self.refs.clear()


class _LocalEnd:
    """Rank 0's end in the driver process (a learner there): a WeightSender run in one thread."""

    def __init__(self, ray: Any, learner: Any, cuda: bool):
        self.ray, self.learner = ray, learner
        self.sender = WeightSender(transport_device(cuda))
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlvr-weights")

    def open(self, world: int) -> tuple[str, int]:
        host = self.ray.util.get_node_ip_address()
        return host, self.sender.open(host, world)

    def join(self, generation: int) -> list[Any]:
        return [self.pool.submit(self.sender.join, generation)]

    def keep(self, version: int, state: dict[str, torch.Tensor], keep_from: int) -> None:
        self.sender.keep(version, state, keep_from)

    def publish(self, version: int, keep_from: int) -> list[Any]:
        state = self.learner.weights_for_generation()  # gathered here: the learner is this thread's
        return [self.pool.submit(self.sender.publish, version, state, keep_from)]

    def send(self, versions: list[int]) -> list[Any]:
        return [self.pool.submit(self.sender.send, versions)]

    def abort(self) -> None:
        self.sender.abort()

    def states(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return self.sender.states(versions)

    def close(self) -> None:
        self.sender.abort()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.sender.close()


class BroadcastRoute:
    """Each version broadcast by the learner's rank 0 to every actor over a weight group."""

    name = "broadcast"

    def __init__(self, ray: Any, pool: Any, learner: Any, cuda: bool):
        self.ray, self.pool, self.cuda = ray, pool, cuda
        group_end = getattr(learner, "weights_end", None)  # a RayLearnerGroup: rank 0 is an actor
        self.end = group_end(cuda) if group_end is not None else _LocalEnd(ray, learner, cuda)
        self.held: set[int] = set()
        self.generation = -1
        self._replacing = False
        pool.on_replaced = self.rebuild

    def seed(self, lagged: dict[int, dict[str, torch.Tensor]]) -> None:
        for version, state in sorted(lagged.items()):
            self.end.keep(version, state, min(lagged))
            self.held.add(version)

    def publish(self, learner: Any, keep_from: int) -> None:
        if self.generation < 0:
            self.rebuild()  # the first group: sends the seeded versions, if any
        version = learner.version
        self.held = {v for v in self.held if v >= keep_from} | {version}
        receives = self._on_actors("receive_weights", version, keep_from)
        self._wait(self.end.publish(version, keep_from), receives, f"the broadcast of version {version}")

    def versions(self) -> set[int]:
        return set(self.held)

    def argument(self, version: int) -> None:
        return None  # the actor takes the version from its ring

    def states(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return self.end.states(versions)

    def rebuild(self) -> None:
        """Build a new generation of the group with every current actor; send every held version again."""
        if self._replacing:
            return  # the route replaces actors itself and rebuilds once they are all in
        self.generation += 1
        world = self.pool.num + 1
        host, port = self.end.open(world)
        joins = [
            a.handle.join_weights.options(concurrency_group="weights").remote(
                host, port, k + 1, world, self.generation, self.cuda
            )
            for k, a in enumerate(self.pool.actors)
        ]
        self._wait(
            self.end.join(self.generation), self._by_shard(joins), f"the weight group's rendezvous at {host}:{port}"
        )
        versions = sorted(self.held)
        if versions:
            receives = [self._on_actors("receive_weights", v, versions[0]) for v in versions]
            merged = {k: [r[k][0] for r in receives] for k in range(self.pool.num)}
            self._wait(self.end.send(versions), merged, f"sending versions {versions} again")
        logger.info("ray: weight group generation %d: %d members at %s:%d", self.generation, world, host, port)

    def _on_actors(self, method: str, *args: Any) -> dict[int, list[Any]]:
        return self._by_shard(
            [getattr(a.handle, method).options(concurrency_group="weights").remote(*args) for a in self.pool.actors]
        )

    @staticmethod
    def _by_shard(refs: list[Any]) -> dict[int, list[Any]]:
        return {k: [ref] for k, ref in enumerate(refs)}

    def _wait(self, sender: list[Any], actors: dict[int, list[Any]], what: str) -> None:
        """Wait for rank 0 and the actors; on an actor's death abort, replace and rebuild (invariant 2)."""
        deadline, pause = time.monotonic() + _SYNC_TIMEOUT, 0.001
        dead: dict[int, Exception] = {}
        while not dead:
            dead = self._dead(actors)
            if dead or (
                all(_done(self.ray, r) for r in sender)
                and all(_done(self.ray, r) for rs in actors.values() for r in rs)
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"weight sync: {what} did not finish within {_SYNC_TIMEOUT:.0f} s")
            time.sleep(pause)
            pause = min(2 * pause, _POLL)  # a broadcast of a small model is done in milliseconds
        if not dead:
            for r in sender:
                _result(self.ray, r)  # the learner's error, if any
            for rs in actors.values():
                for r in rs:
                    _result(self.ray, r)  # an actor's error (not a death), if any
            return
        self.end.abort()
        for k, actor in enumerate(self.pool.actors):
            if k not in dead:
                actor.handle.abort_weights.options(concurrency_group="control").remote()
        _settle(self.ray, sender + [r for rs in actors.values() for r in rs])
        self._replacing = True
        try:
            for shard, error in sorted(dead.items()):
                self.pool.replace(shard, self.pool.died(shard, error))  # raises without restarts left
        finally:
            self._replacing = False
        self.rebuild()

    def _dead(self, actors: dict[int, list[Any]]) -> dict[int, Exception]:
        dead = {}
        for shard, refs in actors.items():
            for ref in refs:
                if not _done(self.ray, ref):
                    continue
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayActorError as e:
                    dead[shard] = e
                except Exception:  # noqa: BLE001 - an aborted receive: judged once all are done
                    pass
        return dead

    def close(self) -> None:
        self.end.close()
        self.held.clear()


def make_route(kind: str, ray: Any, pool: Any, learner: Any, cuda: bool) -> ObjectStoreRoute | BroadcastRoute:
    """Build the route ``kind`` (from :func:`choose_route`); ``cuda``: the members hold GPUs (NCCL)."""
    return BroadcastRoute(ray, pool, learner, cuda) if kind == "broadcast" else ObjectStoreRoute(ray)


def transport_device(cuda: bool) -> torch.device:
    """Return the device the group's tensors live on: the member's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def _done(ray: Any, ref: Any) -> bool:
    if isinstance(ref, concurrent.futures.Future):
        return ref.done()
    return bool(ray.wait([ref], timeout=0)[0])


def _result(ray: Any, ref: Any) -> Any:
    return ref.result() if isinstance(ref, concurrent.futures.Future) else ray.get(ref)


def _settle(ray: Any, refs: list[Any]) -> None:
    """Wait a bounded time for aborted calls to return; their errors are expected and dropped."""
    deadline = time.monotonic() + _ABORT_GRACE
    for ref in refs:
        while not _done(ray, ref) and time.monotonic() < deadline:
            time.sleep(_POLL)
