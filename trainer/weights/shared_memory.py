"""Weights from the learner to the generator, with their version: the protocol and a shared-memory transport.

``WeightTransport`` is the seam: the learner ``publish``es full weights by name with a
version after each step; the generator asks for ``latest_version``, waits for a version
it needs, and ``receive``s weights into its model: the newest, or (the asynchronous
pipeline's fixed lag) the oldest still held at or after a version it names. This module
implements it for two processes on one machine; the NCCL-broadcast and vLLM transports of
multi-GPU training plug into the same calls.

``SharedMemoryTransport`` keeps ``slots`` slots of shared CPU tensors (one flat buffer per
dtype and slot; at least two) and a small shared counter table, created by the learner
before the generator process starts and handed to it as a process argument (torch shares
the storages). The pipeline sizes it ``max_staleness + 1``: the generator samples step
``s`` with exactly version ``s - 1 - eta`` while the learner may already have published up
to ``s - 1``, so the last ``eta + 1`` versions must all stay readable. That costs
``eta + 1`` copies of the weights in host memory: fine for the models a CPU trains, and
the reason a multi-GPU run sends weights by NCCL instead.

Invariants:

1. **One writer.** Only the learner process publishes; any number of processes read.
2. **Ring of slots.** Version ``v`` is written to slot ``v % slots``. The slot's sequence
   counter is made odd before the copy and even after it; then ``latest = v``.
3. **Seqlock reads.** A reader picks a slot by the versions the table says it holds,
   copies it into its model and keeps the copy only if the slot's counter was even and
   unchanged across the copy and the slot still holds the version it read; otherwise (the
   writer lapped it) it picks again. A torn copy is never used.
4. **No long locks.** The counters are read and written under a process-shared lock held
   for a few integer operations (which also orders the copies against the counters on
   any CPU); copies run outside it, so neither side ever waits for the other's copy. The
   lock is taken with a timeout, so a process killed while holding it gives a clear
   ``TransportError`` instead of a hang; sooner where the learner ``watch``es the
   generator's liveness (its death ends the wait at once).
5. **Monotone versions.** ``latest`` only grows; publishing an older version raises.

Tied parameters (an LM head sharing the embedding) are stored once, under the first
name ``state_dict`` gives them; ``Generator.update_weights`` accepts either name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlvr.trainer.protocols import Generator

# Counter table rows: 0 = each slot's sequence counter, 1 = the version each slot holds; [2, 0] = latest.
_SEQ, _VERSION, _LATEST = 0, 1, 2
_LOCK_TIMEOUT = 10.0
_LOCK_SLICE = 0.05  # a watched wait checks the peer's liveness this often


class TransportError(RuntimeError):
    """The transport cannot proceed (a lock left held by a dead process, a bad version)."""


class WeightTransport(Protocol):
    """How new weights reach the generator. Implementations: shared memory (here); NCCL, vLLM."""

    def publish(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Make ``weights`` (full, by name) the newest, as ``version`` (learner side)."""
        ...

    def latest_version(self) -> int:
        """Return the newest published version (-1 before the first publish)."""
        ...

    def wait_for_version(self, min_version: int, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until ``latest_version() >= min_version``; return whether it is."""
        ...

    def receive(self, generator: Generator, oldest: int | None = None) -> int:
        """Load weights into ``generator`` (generator side); return their version.

        The newest by default; with ``oldest``, the oldest version still held that is
        ``>= oldest`` (the pipeline's fixed lag: exactly ``oldest`` when it was published).
        """
        ...


@dataclass(frozen=True)
class _Entry:
    """Where one named tensor lives in the flat buffers."""

    name: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SharedMemoryTransport:
    """A ring of shared-memory slots and a seqlock: implements ``WeightTransport`` on one machine."""

    def __init__(self, template: Mapping[str, torch.Tensor], lock: Any, poll_interval: float = 0.002, slots: int = 2):
        """Allocate ``slots`` slots (at least 2) shaped like ``template`` (e.g. ``learner.weights_for_generation()``).

        ``lock`` is a process-shared lock from the multiprocessing context the generator is
        started with (``ctx.Lock()``).
        """
        if slots < 2:
            raise ValueError(f"slots must be >= 2 (a reader copies one while the writer fills another), got {slots}")
        self._lock = lock
        self._peer_alive: Callable[[], bool] | None = None
        self.poll_interval = poll_interval
        self._entries: list[_Entry] = []
        sizes: dict[torch.dtype, int] = {}
        seen: set[int] = set()
        for name, tensor in template.items():
            if tensor.data_ptr() in seen:  # a tied alias of a tensor already stored
                continue
            seen.add(tensor.data_ptr())
            offset = sizes.get(tensor.dtype, 0)
            self._entries.append(_Entry(name, tensor.dtype, offset, tuple(tensor.shape)))
            sizes[tensor.dtype] = offset + tensor.numel()
        self._slots = [
            {dtype: torch.zeros(size, dtype=dtype).share_memory_() for dtype, size in sizes.items()}
            for _ in range(slots)
        ]
        self._counters = torch.zeros(3, slots, dtype=torch.int64).share_memory_()
        self._counters[_VERSION:] = -1

    def watch(self, peer_alive: Callable[[], bool]) -> None:
        """End this side's lock waits with an error as soon as ``peer_alive()`` is false.

        The learner watches its generator: a generator killed while holding the lock (it takes
        it to read weights) is then reported at once, not after the lock timeout. Not pickled:
        the generator's copy of the transport waits plainly.
        """
        self._peer_alive = peer_alive

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_peer_alive": None}

    @property
    def slots(self) -> int:
        return len(self._slots)

    # --- the WeightTransport protocol ------------------------------------------------------

    def publish(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy ``weights`` into the slot of ``version`` and make it the newest."""
        with self._locked():
            latest = int(self._counters[_LATEST, 0])
            if version <= latest:
                raise TransportError(f"publish version {version} after version {latest}: versions only grow")
            slot = version % self.slots
            self._counters[_SEQ, slot] += 1  # odd: being written
        views = self._views(slot)
        with torch.no_grad():
            for entry in self._entries:
                views[entry.name].copy_(weights[entry.name])
        with self._locked():
            self._counters[_VERSION, slot] = version
            self._counters[_SEQ, slot] += 1  # even: complete
            self._counters[_LATEST, 0] = version

    def latest_version(self) -> int:
        with self._locked():
            return int(self._counters[_LATEST, 0])

    def wait_for_version(self, min_version: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.latest_version() < min_version:
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)
        return True

    def receive(self, generator: Generator, oldest: int | None = None) -> int:
        """Seqlock read of a slot into ``generator`` (see the module invariants and ``WeightTransport.receive``)."""
        while True:
            with self._locked():
                slot, version = self._pick(oldest)
                seq = int(self._counters[_SEQ, slot])
                stable = seq % 2 == 0 and int(self._counters[_VERSION, slot]) == version
            if stable:
                generator.update_weights(self._views(slot), version)
                with self._locked():
                    if int(self._counters[_SEQ, slot]) == seq:
                        return version
            time.sleep(self.poll_interval)  # lapped by the writer: pick again

    # --- the writer's own reads (the learner process) ---------------------------------------

    def held_versions(self) -> list[int]:
        """Return the versions the slots hold whole, oldest first.

        Without the lock: only the writer calls this, so no counter changes under it, and a
        generator that died holding the lock cannot block it (a restart needs these weights).
        """
        held = [int(v) for v, seq in zip(self._counters[_VERSION], self._counters[_SEQ]) if v >= 0 and seq % 2 == 0]
        return sorted(held)

    def snapshot(self, version: int) -> dict[str, torch.Tensor]:
        """Return a copy of the weights of ``version`` (writer side: for checkpoints and restarts)."""
        slot = version % self.slots
        if int(self._counters[_VERSION, slot]) != version or int(self._counters[_SEQ, slot]) % 2:
            raise TransportError(f"version {version} is not held (held: {self.held_versions()})")
        return {name: view.clone() for name, view in self._views(slot).items()}

    # --- internals -------------------------------------------------------------------------

    def _pick(self, oldest: int | None) -> tuple[int, int]:
        """Return (slot, version) to read: the newest, or the oldest held ``>= oldest`` (lock held)."""
        latest = int(self._counters[_LATEST, 0])
        if latest < 0:
            raise TransportError("receive before any publish")
        if oldest is None or oldest > latest:
            return latest % self.slots, latest
        held = [int(v) for v in self._counters[_VERSION] if v >= oldest]
        version = min(held, default=latest)  # a slot being rewritten still lists its old version: checked after
        return version % self.slots, version

    def _views(self, slot: int) -> dict[str, torch.Tensor]:
        buffers = self._slots[slot]
        return {e.name: buffers[e.dtype][e.offset : e.offset + e.numel].view(e.shape) for e in self._entries}

    def _locked(self) -> _Held:
        return _Held(self._lock, self._peer_alive)


class _Held:
    """``with`` a lock acquired with a timeout: a lock left held by a dead process is an error."""

    def __init__(self, lock: Any, peer_alive: Callable[[], bool] | None):
        self.lock, self.peer_alive = lock, peer_alive

    def __enter__(self) -> None:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while not self.lock.acquire(timeout=_LOCK_SLICE if self.peer_alive else _LOCK_TIMEOUT):
            if self.peer_alive is not None and not self.peer_alive():
                raise TransportError("weight transport lock not free and the process on the other side is dead")
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"weight transport lock not free after {_LOCK_TIMEOUT:.0f} s: a process died while holding it"
                )

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
