"""The learner as a group of Ray actors: DeepSpeed data parallel over ``torch.distributed`` (``--learner-ranks M``).

    python scripts/train.py --cluster ray --learner deepspeed --zero-stage 2 --learner-ranks 2 --max-staleness 1

Each of the ``M`` ranks is a :class:`LearnerRank` actor holding a ``DeepSpeedLearner``
(``engines/deepspeed_learner.py``): the same learner a ``torchrun`` launch gives, except that Ray
places the processes (one placement-group bundle per rank: a GPU where the run's device is
CUDA, else a CPU) and the driver plays the launcher, setting ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (0: Ray shows each rank only its own GPU), ``MASTER_ADDR`` and
``MASTER_PORT`` (rank 0's node and a free port there) before each rank joins the process
group (gloo on CPU, NCCL on GPU). The driver keeps the loop: it packs the batch, sends
rank ``r`` its shard (``TrainBatch.shard``, as ``distributed.scatter_batch`` does under a
launcher), and every rank takes the step; their metrics are already the whole batch's.

:class:`RayLearnerGroup` is the driver's handle and implements the ``Learner`` protocol, so
``checkpoint.save_checkpoint`` / ``load_checkpoint`` work on it unchanged (every rank
writes its DeepSpeed shard into the same folder: on several nodes ``--output-dir`` must be
a filesystem they share). ``weights_ref`` hands rank 0's gathered weights to the
generators as an object-store reference, without a copy through the driver.

Invariants:

1. **Collective calls go to every rank, in the same order**: ``setup``, ``step``,
   ``weights``, ``save``, ``load`` are sent to all ranks before any result is awaited,
   so no rank waits in a collective for one that was never asked.
2. **Bounded waits.** The driver waits on the ranks a fraction of a second at a time; a
   rank that dies is a :class:`RayLearnerError` naming it, its node and Ray's cause (its
   optimizer state is gone with it: the run stops, the last checkpoint stands); the
   survivors are killed with the group, so none waits in a collective forever.
3. **Nothing left.** :meth:`RayLearnerGroup.close` kills every rank and removes the
   placement group.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch

from rlvr.trainer.algorithm.batch import TrainBatch
from rlvr.trainer.cluster.ray_runtime import Place, RayCluster, here, remote_class
from rlvr.trainer.cluster.weight_routes import transport_device
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import build_learner, resolve_device, setup_process
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.weights.broadcast import WeightSender

logger = logging.getLogger(__name__)

_POLL = 0.2
_GRACE = 5.0  # seconds to let the other ranks' failures arrive once one rank failed
_SETUP_TIMEOUT = 600.0  # seconds for every rank to load the model and join the process group


class RayLearnerError(RuntimeError):
    """A learner rank died or raised; the message names it, its node and the cause."""


class LearnerRank:
    """One data-parallel rank (wrapped with ``ray.remote`` by the group)."""

    def __init__(self, config: TrainConfig, rank: int, world: int, threads: int):
        self.config, self.rank, self.world, self.threads = config, rank, world, threads
        self.learner: Any = None
        self.sender: WeightSender | None = None  # rank 0's end of the broadcast route (cluster/weight_routes.py)

    def where(self) -> Place:
        return here(f"rlvr-learner-{self.rank}")

    def free_port(self) -> int:
        """Return a port free on this node now (rank 0's: the process group's rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the DeepSpeed learner (collective); return the learner's version."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))  # fmt: skip
        setup_process(self.config, self.threads)
        device = resolve_device(self.config.device)
        model = load_model(self.config.model)[0].to(device)
        self.learner = build_learner(self.config, model, device)
        return self.learner.version

    def step(self, shard: TrainBatch, on_policy: bool) -> dict[str, float]:
        return self.learner.step(shard.to(self.learner.device), on_policy=on_policy)

    def weights(self) -> dict[str, torch.Tensor]:
        """Return the full weights on rank 0, ``{}`` elsewhere (collective at ZeRO-3)."""
        return {k: v.to("cpu") for k, v in self.learner.weights_for_generation().items()}

    def save(self, path: str) -> None:
        self.learner.save(path)

    def load(self, path: str) -> int:
        self.learner.load(path)
        return self.learner.version

    # --- the broadcast route (rank 0 sends; the others only take part in gathering the weights)

    def open_weights(self, world: int, cuda: bool) -> tuple[str, int]:
        if self.sender is None:
            self.sender = WeightSender(transport_device(cuda))
        host = here("").node_ip
        return host, self.sender.open(host, world)

    def join_weights(self, generation: int) -> None:
        assert self.sender is not None, "open_weights first"
        self.sender.join(generation)

    def keep_weights(self, version: int, state: dict[str, torch.Tensor], keep_from: int) -> None:
        assert self.sender is not None, "open_weights first"
        self.sender.keep(version, state, keep_from)

    def publish_weights(self, version: int, keep_from: int) -> None:
        """Gather the weights (collective at ZeRO-3: every rank); rank 0 keeps and broadcasts them."""
        state = self.learner.weights_for_generation()
        if self.rank == 0:
            assert self.sender is not None, "open_weights first"
            self.sender.publish(version, state, keep_from)

    def send_weights(self, versions: list[int]) -> None:
        assert self.sender is not None, "open_weights first"
        self.sender.send(versions)

    def abort_weights(self) -> None:
        """End a broadcast in flight (``control`` concurrency group)."""
        if self.sender is not None:
            self.sender.abort()

    def held_weights(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        assert self.sender is not None, "open_weights first"
        return self.sender.states(versions)


class RayLearnerGroup:
    """The driver's handle on the ranks: the ``Learner`` protocol, each call sent to every rank."""

    def __init__(self, cluster: RayCluster, config: TrainConfig, threads: int, gpus: bool, threaded: bool = False):
        """``threaded``: a ``control`` concurrency group, to abort rank 0's broadcast (the broadcast route)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray, self.cluster, self.world = cluster.ray, cluster, config.learner_ranks
        bundle = {"CPU": 1.0, "GPU": 1.0} if gpus else {"CPU": 1.0}
        self.group = cluster.place([dict(bundle) for _ in range(self.world)], "learner ranks")
        remote = remote_class(LearnerRank, {"control": 1} if threaded else None)
        self.ranks = [
            remote.options(
                name=f"rlvr-learner-{r}",
                num_cpus=1,
                num_gpus=1 if gpus else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=r),
            ).remote(config, r, self.world, threads)
            for r in range(self.world)
        ]
        self.places: list[Place | None] = [None] * self.world
        try:
            self.places = self._all([rank.where.remote() for rank in self.ranks], "start")
            master, port = self.places[0].node_ip, self._all([self.ranks[0].free_port.remote()], "start")[0]
            setups = [rank.setup.remote(master, port) for rank in self.ranks]
            self.version = self._all(setups, "setup", timeout=_SETUP_TIMEOUT)[0]
        except BaseException:
            self.close()
            raise
        logger.info("ray: %d learner ranks ready, process group at %s:%d", self.world, master, port)

    # --- the Learner protocol ----------------------------------------------------------

    def step(self, batch: TrainBatch, on_policy: bool = False) -> dict[str, float]:
        """One optimizer step on ``batch``, rank ``r`` on shard ``r``; the metrics are the whole batch's."""
        shards = [batch.shard(r, self.world).to("cpu") for r in range(self.world)]
        metrics = self._all([rank.step.remote(s, on_policy) for rank, s in zip(self.ranks, shards)], "step")[0]
        self.version += 1
        return metrics

    def weights_ref(self) -> Any:
        """Return an ObjectRef of the full weights, gathered by rank 0 (collective on the ranks)."""
        refs = [rank.weights.remote() for rank in self.ranks]
        self._all(refs[1:], "weights", first_rank=1)  # the others' {}: the collective is through
        return refs[0]

    def weights_for_generation(self) -> dict[str, torch.Tensor]:
        return self.ray.get(self.weights_ref())

    def weights_end(self, cuda: bool) -> _GroupEnd:
        """Rank 0's end of the broadcast route, driven from here (``cluster/weight_routes.BroadcastRoute``)."""
        return _GroupEnd(self, cuda)

    def save(self, path: str) -> None:
        self._all([rank.save.remote(path) for rank in self.ranks], "save")

    def load(self, path: str) -> None:
        self.version = self._all([rank.load.remote(path) for rank in self.ranks], "load")[0]

    # --- waiting and teardown ------------------------------------------------------------

    def _all(self, refs: list[Any], what: str, timeout: float | None = None, first_rank: int = 0) -> list[Any]:
        """Wait for the results of ranks ``first_rank ..`` a short wait at a time; a failure is a RayLearnerError."""
        pending, failed = list(refs), {}
        waited = 0.0
        while pending and not failed:
            done, pending = self.ray.wait(pending, num_returns=len(pending), timeout=_POLL)
            failed = self._errors(refs, done)
            waited += _POLL
            if timeout is not None and pending and waited > timeout:
                raise RayLearnerError(f"the learner ranks did not finish {what} within {timeout:.0f} s")
        if failed:
            # When one rank dies, the others fail in their collective a moment later: wait a
            # little for those, so that the dead rank is the one named, not a survivor.
            done, _ = self.ray.wait(pending, num_returns=len(pending), timeout=_GRACE) if pending else ([], [])
            failed |= self._errors(refs, done)
            died = [i for i, e in failed.items() if isinstance(e, self.ray.exceptions.RayActorError)]
            i = min(died or failed)
            who = self.places[first_rank + i]
            verb = "died" if died else "failed"
            raise RayLearnerError(f"learner rank {who or 'of the group'} {verb} in {what}: {failed[i]}")
        return self.ray.get(refs)

    def _errors(self, refs: list[Any], done: list[Any]) -> dict[int, Exception]:
        """Return the errors among ``done``, by position in ``refs``."""
        errors = {}
        for ref in done:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                errors[refs.index(ref)] = e
        return errors

    def close(self) -> None:
        for rank in self.ranks:
            try:
                self.ray.kill(rank, no_restart=True)
            except Exception as e:  # noqa: BLE001 - teardown goes on for the others
                logger.warning("ray: could not kill a learner rank: %s", e)
        self.ranks = []
        self.cluster.remove(self.group)


class _GroupEnd:
    """The broadcast route's sender when the learner is a rank group: rank 0 sends, every rank gathers."""

    def __init__(self, group: RayLearnerGroup, cuda: bool):
        self.group, self.cuda = group, cuda
        self.rank0 = group.ranks[0]

    def open(self, world: int) -> tuple[str, int]:
        return self.group._all([self.rank0.open_weights.remote(world, self.cuda)], "open the weight group")[0]

    def join(self, generation: int) -> list[Any]:
        return [self.rank0.join_weights.remote(generation)]

    def keep(self, version: int, state: dict[str, torch.Tensor], keep_from: int) -> None:
        self.group._all([self.rank0.keep_weights.remote(version, state, keep_from)], "keep weights")

    def publish(self, version: int, keep_from: int) -> list[Any]:
        return [rank.publish_weights.remote(version, keep_from) for rank in self.group.ranks]

    def send(self, versions: list[int]) -> list[Any]:
        return [self.rank0.send_weights.remote(versions)]

    def abort(self) -> None:
        self.rank0.abort_weights.options(concurrency_group="control").remote()

    def states(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return self.group._all([self.rank0.held_weights.remote(versions)], "read the held weights")[0]

    def close(self) -> None:
        pass  # the ranks, and their groups, go with the RayLearnerGroup
