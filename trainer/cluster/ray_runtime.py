"""Joining or starting a Ray cluster, and placing a run's actors on it (``--cluster ray``).

    python scripts/train.py --env arithmetic --cluster ray --num-generators 2 --max-staleness 1
    ray start --head && python scripts/train.py --cluster ray --ray-address auto ...

Ray is an optional extra (``pip install 'rlvr[ray]'``): nothing outside ``ray_*.py``
imports it, and these modules import it only inside :func:`require_ray`, so a missing
Ray is a usage error that says what to install, never an ``ImportError`` at start-up.

:class:`RayCluster` is the run's hold on Ray. With ``--ray-address`` (or ``RAY_ADDRESS``,
which ``ray job submit`` sets) it joins that cluster; without, it starts a local one sized
for the run (logical CPUs: the machine's, or as many as the run's actors ask for), with a
small object store and no dashboard, even where a ``ray start`` cluster runs. It shuts Ray
down at the end only if it started it; a cluster it joined, or a Ray the caller had
already initialised, is left running, and only the run's own actors are killed.

:func:`place` reserves the resources of a group of actors as one placement group (one
bundle per actor: a GPU where the run's device is a GPU, else a CPU) and waits for it a
bounded time: a cluster that cannot hold the group is an ``EngineError`` naming what was
asked for and what the cluster has, not a run that waits forever.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from rlvr.trainer.engines.build import EngineError, EngineUnavailable, installed

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT = 120.0
"""Seconds to wait for a placement group's resources before giving up with an error."""
LOCAL_OBJECT_STORE_MIN = 200 * 2**20
"""Object store of a local Ray: at least 200 MB (enough for the default model's weights many times over)."""


def require_ray() -> Any:
    """Return the ``ray`` module, or raise a usage error that says how to install it."""
    if not installed("ray"):
        raise EngineUnavailable("--cluster ray needs Ray: `pip install 'rlvr[ray]'` (or `pip install ray`)")
    import ray

    return ray


@dataclass(frozen=True)
class Place:
    """Where an actor runs: named in every error about it."""

    name: str
    node_ip: str
    node_id: str
    hostname: str
    pid: int

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid} on {self.hostname}, node {self.node_ip} {self.node_id[:12]})"


def remote_class(cls: type, concurrency_groups: dict[str, int] | None = None) -> Any:
    """``ray.remote(cls)``, with named concurrency groups of their own threads if given."""
    ray = require_ray()
    return ray.remote(concurrency_groups=concurrency_groups)(cls) if concurrency_groups else ray.remote(cls)


def here(name: str) -> Place:
    """Return where the calling actor (or driver) runs (call inside the actor)."""
    ray = require_ray()
    context = ray.get_runtime_context()
    return Place(name, ray.util.get_node_ip_address(), context.get_node_id(), socket.gethostname(), os.getpid())


class RayCluster:
    """The run's connection to Ray: joined or started in ``__init__``, released by ``close``."""

    def __init__(self, address: str | None, num_cpus: int, object_store_bytes: int):
        self.ray = require_ray()
        self.owned = False
        if self.ray.is_initialized():
            logger.info("ray: using the Ray this process already initialised")
            return
        common: dict[str, Any] = dict(namespace=f"rlvr-{uuid.uuid4().hex[:8]}", logging_level=logging.WARNING)
        address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
        if address:
            self.ray.init(address=address, **common)
            logger.info("ray: joined the cluster at %s: %s", address, _resources(self.ray.cluster_resources()))
        else:
            cpus = max(os.cpu_count() or 1, num_cpus)
            store = max(LOCAL_OBJECT_STORE_MIN, object_store_bytes)
            # address="local": a new Ray even where `ray start` left /tmp/ray/ray_current_cluster behind.
            self.ray.init("local", num_cpus=cpus, object_store_memory=store, include_dashboard=False, **common)
            logger.info("ray: started a local Ray (%d logical CPUs, %d MB object store)", cpus, store >> 20)
        self.owned = True

    def gpus(self) -> float:
        """Return the GPUs the cluster has (0 on a CPU cluster)."""
        return float(self.ray.cluster_resources().get("GPU", 0))

    def place(self, bundles: list[dict[str, float]], what: str, timeout: float | None = None) -> Any:
        """Reserve ``bundles`` as one placement group (PACK: one node when they fit); raise if they never fit."""
        from ray.util.placement_group import placement_group, remove_placement_group

        timeout = PLACEMENT_TIMEOUT if timeout is None else timeout
        group = placement_group(bundles, strategy="PACK")
        ready, _ = self.ray.wait([group.ready()], timeout=timeout)
        if not ready:
            remove_placement_group(group)
            raise EngineError(
                f"the Ray cluster cannot place the {what} ({len(bundles)} x {bundles[0]}) within {timeout:.0f} s; "
                f"it has {_resources(self.ray.cluster_resources())}, of which "
                f"{_resources(self.ray.available_resources())} are free"
            )
        return group

    def remove(self, group: Any) -> None:
        """Release a placement group (its actors must be gone or they die with it)."""
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(group)
        except Exception as e:  # noqa: BLE001 - best effort at teardown; the cluster may be gone
            logger.warning("ray: could not remove a placement group: %s", e)

    def close(self) -> None:
        """Shut Ray down if this run started it (every worker process goes with it)."""
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        self.owned = False


def _resources(resources: dict[str, float]) -> str:
    def show(key: str) -> str:
        value = resources[key]
        return f"{key} {value / 2**30:.1f} GiB" if "memory" in key else f"{key} {value:.0f}"

    return ", ".join(show(k) for k in ("CPU", "GPU", "memory", "object_store_memory") if k in resources)
