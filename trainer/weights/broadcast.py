"""Weights from the learner's rank 0 to every generator over one collective group.

The route of the field between machines (OpenRLHF, verl, AReaL): the learner's rank 0 and
the ``N`` generators form a process group of ``N + 1`` members of their own, apart from
the learner's data-parallel group (which DeepSpeed owns as the default group), and each
new version goes out as a few broadcasts from rank 0: NCCL where the members hold GPUs
(GPU memory to GPU memory, no host copy), gloo where they do not (so the same code runs,
and is tested, on CPUs). Nothing here knows about Ray: ``cluster/weight_routes.py`` places the
members and drives them.

* **Buckets.** The tensors are packed, in the order of a :class:`Manifest` every member
  holds, into flat buffers of one dtype of at most ``bucket_bytes`` each (a tensor larger
  than that goes alone): a model of hundreds of tensors is a handful of collectives, and
  no member ever holds more than one bucket beyond the weights themselves.
* **Rendezvous.** Rank 0 hosts a ``TCPStore`` on a free port of its node
  (:func:`open_store`); the others connect to it; each rebuild of the group (after a
  generator was replaced) is a new ``generation`` and a new store, so nothing of the
  old group is reused.
* **Bounded, abortable waits.** Every collective is waited on by polling its ``Work``
  with a deadline, and :meth:`WeightGroup.abort` (from another thread) ends the wait
  with :class:`WeightSyncAborted`: a member that died mid-broadcast costs a rebuild, not a
  hang. A peer that is gone makes gloo fail at once; NCCL's own watchdog ends it after the
  group's timeout.

NCCL allows one member per GPU: a learner and a generator sharing one GPU cannot use
this route (the object store route serves them; ``cluster/weight_routes.choose_route``).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 * 2**20
"""Largest flat buffer per broadcast (a tensor larger than this goes alone)."""
TIMEOUT = 300.0
"""Seconds a rendezvous or a broadcast may take before it is an error."""
_POLL, _POLL_MAX = 0.0002, 0.005
_RETIRED: list[dist.ProcessGroup] = []  # groups left, kept alive until their backends let go


class WeightSyncAborted(RuntimeError):
    """A broadcast or rendezvous was aborted (a member died) or timed out; the group is unusable."""


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class Manifest:
    """The names, shapes and dtypes of the weights, in broadcast order: the same on every member."""

    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> Manifest:
        return cls(tuple(Entry(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()))

    def to_json(self) -> str:
        return json.dumps([[e.name, list(e.shape), e.dtype] for e in self.entries])

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls(tuple(Entry(name, tuple(shape), dtype) for name, shape, dtype in json.loads(text)))

    def buckets(self, bucket_bytes: int = BUCKET_BYTES) -> list[list[Entry]]:
        """Split the entries, in order, into runs of one dtype of at most ``bucket_bytes`` each."""
        buckets: list[list[Entry]] = []
        size = 0
        for entry in self.entries:
            last = buckets[-1] if buckets else None
            if last is None or last[0].dtype != entry.dtype or size + entry.nbytes > bucket_bytes:
                buckets.append([entry])
                size = entry.nbytes
            else:
                last.append(entry)
                size += entry.nbytes
        return buckets


def open_store(host: str, world: int, timeout: float = TIMEOUT) -> dist.TCPStore:
    """Host the group's rendezvous on rank 0's node, on a port the OS picks (``store.port``)."""
    return dist.TCPStore(host, 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)  # fmt: skip


class WeightGroup:
    """One member of the weight group: rank 0 sends (:meth:`send`), the others receive (:meth:`recv`)."""

    def __init__(self, host: str, port: int, rank: int, world: int, device: torch.device, generation: int,
                 store: dist.TCPStore | None = None, timeout: float = TIMEOUT,
                 bucket_bytes: int = BUCKET_BYTES):  # fmt: skip
        self.rank, self.world, self.device, self.timeout = rank, world, device, timeout
        self.bucket_bytes = bucket_bytes
        self._aborted = threading.Event()
        if store is None:
            store = dist.TCPStore(host, port, world, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        self._store = store  # rank 0's hosts the rendezvous: it lives as long as the group
        prefixed = self._prefixed = dist.PrefixStore(f"rlvr-weights-{generation}", store)
        self._ids: dict[Manifest, int] = {}  # rank 0: manifests sent, by their id in the store
        self._manifests: dict[str, Manifest] = {}  # the others: manifests read, by key
        span = datetime.timedelta(seconds=timeout)
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = span
                self.pg: dist.ProcessGroup = dist.ProcessGroupNCCL(prefixed, rank, world, options)
            else:
                self.pg = dist.ProcessGroupGloo(prefixed, rank, world, span)
        except RuntimeError as e:  # DistStoreError: the others did not come within the timeout
            raise WeightSyncAborted(
                f"weight group member {rank} of {world}: the rendezvous at {host}:{port} failed: {e}"
            ) from e
        self._broadcast(torch.zeros(1, device=device))  # the rendezvous: every member is in

    def send(self, state: dict[str, torch.Tensor]) -> float:
        """Broadcast ``state`` (rank 0) in the manifest's buckets; return the bytes sent.

        A header broadcast first names the state's manifest, put in the group's store the
        first time it is sent (a checkpoint's lagged weights may list tied tensors
        differently from the live ones): receivers need no model to know the layout.
        """
        manifest = Manifest.of(state)
        if manifest not in self._ids:
            self._ids[manifest] = len(self._ids)
            self._prefixed.set(f"manifest/{self._ids[manifest]}", manifest.to_json())
        self._broadcast(torch.tensor([self._ids[manifest]], dtype=torch.int64, device=self.device))
        sent = 0
        for bucket in manifest.buckets(self.bucket_bytes):
            flat = torch.cat([state[e.name].detach().reshape(-1).to(self.device, _dtype(e.dtype)) for e in bucket])
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def recv(self) -> dict[str, torch.Tensor]:
        """Receive one version (ranks > 0): tensors on this member's device, views of the buckets."""
        header = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        key = f"manifest/{int(header.item())}"
        if key not in self._manifests:  # put in the store by rank 0 before the header went out
            self._manifests[key] = Manifest.from_json(self._prefixed.get(key))
        manifest = self._manifests[key]
        state: dict[str, torch.Tensor] = {}
        for bucket in manifest.buckets(self.bucket_bytes):
            flat = torch.empty(sum(_numel(e.shape) for e in bucket), dtype=_dtype(bucket[0].dtype), device=self.device)
            self._broadcast(flat)
            offset = 0
            for e in bucket:
                n = _numel(e.shape)
                state[e.name] = flat[offset : offset + n].view(e.shape)
                offset += n
        return state

    def abort(self) -> None:
        """End the wait of a broadcast in flight (from another thread); the group is not used again."""
        self._aborted.set()

    def close(self) -> None:
        """Leave the group without waiting: after an abort its backend may block until its own timeout.

        Gloo's threads may be waiting on a peer that will never send (the sender aborted
        mid-broadcast), and its shutdown or destructor would wait with them; so the group is
        shut down (NCCL: aborted) in a daemon thread and kept referenced until then.
        """
        pg, aborted = self.pg, self._aborted.is_set()
        _RETIRED.append(pg)

        def finish() -> None:
            try:
                pg.abort() if aborted else pg.shutdown()
            except Exception:  # noqa: BLE001 - the group is being dropped either way
                pass

        threading.Thread(target=finish, name="rlvr-weight-group-close", daemon=True).start()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        who = f"weight group member {self.rank} of {self.world}"
        try:
            work = self.pg.broadcast([tensor], opts)
        except RuntimeError as e:  # torch's DistBackendError: a peer is gone, NCCL refused, ...
            self._aborted.set()
            raise WeightSyncAborted(f"{who}: the broadcast failed: {e}{_hint(e)}") from e
        self._wait(work.is_completed, "a broadcast")
        try:
            work.wait()  # raises the backend's error, if the collective failed
        except RuntimeError as e:
            self._aborted.set()
            raise WeightSyncAborted(f"{who}: the broadcast failed: {e}{_hint(e)}") from e
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Poll ``done`` until true; raise WeightSyncAborted on abort or after the group's timeout."""
        deadline, pause = time.monotonic() + self.timeout, _POLL
        while not done():
            if self._aborted.is_set():
                raise WeightSyncAborted(f"weight group member {self.rank} of {self.world}: aborted")
            if time.monotonic() > deadline:
                self._aborted.set()
                raise WeightSyncAborted(
                    f"weight group member {self.rank} of {self.world}: no {what} within {self.timeout:.0f} s"
                )
            time.sleep(pause)
            pause = min(2 * pause, _POLL_MAX)  # quick for a short wait, a few requests a second for a long one


def _hint(error: Exception) -> str:
    if "Duplicate GPU" in str(error):
        return (
            "\nNCCL allows one member per GPU, and two members of the weight group share one: "
            "give each generator and the learner's rank 0 a GPU of its own, or use --weight-sync object-store"
        )
    return ""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight manifest: unknown dtype {name!r}")
    return dtype


def prune(versions: MutableMapping[int, Any], keep_from: int, newest: int) -> None:
    """Drop the versions older than ``keep_from`` but ``newest``: those no step still to sample needs."""
    for v in [v for v in versions if v < keep_from and v != newest]:
        del versions[v]


class WeightSender:
    """Rank 0's end of the route: the current group, and the versions still needed.

    The held versions (host copies, dropped once no step still to learn needs them) are
    what a rebuilt group is sent again, so that a replaced generator gets the older
    versions its steps sample with, and what a checkpoint saves as its lagged weights.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.held: dict[int, dict[str, torch.Tensor]] = {}
        self.group: WeightGroup | None = None
        self._store: dist.TCPStore | None = None

    def open(self, host: str, world: int) -> int:
        """Leave the old group; host a new rendezvous for ``world`` members; return its port."""
        self.close()
        self.host, self.world = host, world
        self._store = open_store(host, world)
        return self._store.port

    def join(self, generation: int) -> None:
        """Join the group opened last (blocks until every member is in)."""
        assert self._store is not None, "open() first"
        self.group = WeightGroup(self.host, self._store.port, 0, self.world, self.device, generation, self._store)

    def keep(self, version: int, state: dict[str, torch.Tensor], keep_from: int) -> None:
        """Hold a host copy of ``version``; drop versions older than ``keep_from`` (never the newest)."""
        self.held[version] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        prune(self.held, keep_from, version)

    def publish(self, version: int, state: dict[str, torch.Tensor], keep_from: int) -> float:
        """Broadcast the new ``version`` from ``state``, then keep its host copy; return bytes.

        The copy comes after the broadcast, so the generators get the weights without waiting
        for it; and in a ``finally``, so an aborted broadcast still leaves the version held for
        the rebuilt group to be sent again.
        """
        try:
            return self.send([version], {version: state})
        finally:
            self.keep(version, state, keep_from)

    def states(self, versions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Return the held host copies of ``versions`` (a checkpoint's lagged weights)."""
        return {v: self.held[v] for v in versions}

    def send(self, versions: list[int], live: dict[int, dict[str, torch.Tensor]] | None = None) -> float:
        """Broadcast ``versions`` in order (from ``live`` where given, else the held copies); return bytes."""
        assert self.group is not None, "join() first"
        live = live or {}
        return sum(self.group.send(live.get(v) or self.held[v]) for v in versions)

    def abort(self) -> None:
        if self.group is not None:
            self.group.abort()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group, self._store = None, None


class WeightReceiver:
    """A generator's end of the route: the current group and a ring of received versions.

    ``receive`` runs in its own thread (the actor's ``weights`` concurrency group) while
    ``get``, in the sampling thread, waits for the version a step names.
    """

    def __init__(self) -> None:
        self.ring: dict[int, dict[str, torch.Tensor]] = {}
        self.group: WeightGroup | None = None
        self._changed = threading.Condition()

    def join(self, host: str, port: int, rank: int, world: int, generation: int, device: torch.device) -> None:
        """Leave the old group, join generation ``generation`` (the ring is kept)."""
        if self.group is not None:
            self.group.close()
        self.group = None
        self.group = WeightGroup(host, port, rank, world, device, generation)

    def receive(self, version: int, keep_from: int) -> None:
        """Receive the next broadcast as ``version``; drop versions older than ``keep_from``."""
        assert self.group is not None, "join() first"
        state = self.group.recv()
        with self._changed:
            self.ring[version] = state
            prune(self.ring, keep_from, version)
            self._changed.notify_all()

    def get(self, version: int, timeout: float = TIMEOUT) -> dict[str, torch.Tensor]:
        """Return ``version`` once received; an error if it has not come within ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: version in self.ring, timeout):
                raise WeightSyncAborted(f"weight version {version} was not received within {timeout:.0f} s "
                                        f"(held: {sorted(self.ring)})")  # fmt: skip
            return self.ring[version]

    def abort(self) -> None:
        if self.group is not None:
            self.group.abort()
