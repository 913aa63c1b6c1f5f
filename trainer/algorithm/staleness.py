"""Admission by staleness, and the learner's buffer of finished batches: the bound of the pipeline as logic alone.

Terms. The learner's *version* ``v`` counts the optimizer steps it has completed; after
each step it publishes weights of version ``v``. Training step ``s`` (1-based) starts from
the weights of version ``s - 1``. A batch sampled with weights of version ``v`` and learned
at step ``s`` has *staleness* ``s - 1 - v``: how many learner steps passed between sampling
and use. ``eta`` is ``TrainConfig.max_staleness``.

Invariants (checked by the code below, tested in ``tests/test_async_queue.py``):

1. **Admission, not dropping.** The generator starts the batch of step ``s`` only with
   weights of version ``>= s - 1 - eta`` (:meth:`Admission.min_version`) and waits for them
   otherwise. So no batch is ever more than ``eta`` steps stale when learned, and no
   finished batch is thrown away: there is no drop path (dropping biases training toward
   what finishes fast). A batch that breaks the bound is a bug, and :meth:`RolloutBuffer.take`
   raises :class:`StalenessViolation` rather than learn from it.
2. **Used at most once.** ``take(s)`` removes batch ``s``; putting a step that was already
   put (or taken) raises.
3. **In order.** Batches are learned in step order, and their versions never decrease as
   the step grows (the generator only ever moves to newer weights).
4. **Bounded look-ahead.** While the learner works on step ``s`` it holds version ``s - 1``,
   so only batches ``s .. s + eta`` can exist: the buffer never holds more than
   ``eta + 1`` batches, and ``put`` raises if it would.
5. **eta = 0 is the synchronous loop.** Batch ``s`` is sampled with exactly version
   ``s - 1``, the weights the learner's step ``s`` starts from.

A batch is sampled wholly with one version (the generator takes new weights only
between batches), so every token of it has the same staleness. Departure from AReaL,
which bounds staleness per request and may swap weights in the middle of a generation
(partial rollouts): here the bound is exact per batch, at the price of coarser overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class StalenessViolation(RuntimeError):
    """A batch broke an invariant of the pipeline (a bug in the producer, never a policy)."""


@dataclass(frozen=True)
class Admission:
    """Which weights may sample which step, for a staleness bound ``max_staleness`` (eta)."""

    max_staleness: int

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    def min_version(self, step: int) -> int:
        """Return the oldest weight version allowed to sample step ``step``: ``max(0, step - 1 - eta)``."""
        return max(0, step - 1 - self.max_staleness)

    def admits(self, step: int, version: int) -> bool:
        """Whether weights of ``version`` may sample step ``step``."""
        return version >= self.min_version(step)

    @staticmethod
    def staleness(step: int, version: int) -> int:
        """Learner steps between sampling with ``version`` and learning at ``step``."""
        return step - 1 - version


@dataclass(frozen=True)
class RolloutItem(Generic[T]):
    """One finished batch: the step it is for, the weight version that sampled it, its data."""

    step: int
    version: int
    payload: T


class RolloutBuffer(Generic[T]):
    """The learner's side of the pipeline: finished batches waiting for their step.

    ``next_step`` is the next step to learn; ``put`` accepts batches for steps at or after
    it, ``take`` hands out exactly ``next_step`` and advances it. Not thread-safe: one
    learner thread owns it (batches arrive through a queue and are ``put`` by that thread).
    """

    def __init__(self, admission: Admission, first_step: int = 1):
        self.admission = admission
        self.next_step = first_step
        self._items: dict[int, RolloutItem[T]] = {}
        self._last_put_version = -1
        self._last_put_step = first_step - 1

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last_put_step(self) -> int:
        """The highest step put so far (``first_step - 1`` if none): where a new producer resumes."""
        return self._last_put_step

    def has(self, step: int) -> bool:
        return step in self._items

    def put(self, item: RolloutItem[T]) -> None:
        """Accept a finished batch; raise if it breaks invariants 1-4."""
        eta = self.admission.max_staleness
        if item.step < self.next_step or item.step in self._items:
            raise StalenessViolation(f"batch for step {item.step} arrived twice (next step to learn: {self.next_step})")
        if not self.admission.admits(item.step, item.version):
            raise StalenessViolation(
                f"batch for step {item.step} was sampled with version {item.version} < "
                f"{self.admission.min_version(item.step)} (max_staleness {eta}): admission was skipped"
            )
        if item.step > self._last_put_step and item.version < self._last_put_version:
            raise StalenessViolation(
                f"batch for step {item.step} has version {item.version}, older than the "
                f"{self._last_put_version} of an earlier step: the generator went back to older weights"
            )
        if len(self._items) >= eta + 1:
            raise StalenessViolation(f"more than max_staleness + 1 = {eta + 1} batches buffered")
        self._items[item.step] = item
        if item.step > self._last_put_step:
            self._last_put_step, self._last_put_version = item.step, item.version

    def take(self, step: int, learner_version: int) -> RolloutItem[T]:
        """Remove and return the batch of ``step``, learned by weights of ``learner_version``.

        Raises ``KeyError`` if it has not arrived (the caller waits and retries) and
        :class:`StalenessViolation` if ``step`` is out of order or the batch is too stale.
        """
        if step != self.next_step:
            raise StalenessViolation(f"step {step} taken out of order (next step to learn: {self.next_step})")
        if step not in self._items:
            raise KeyError(step)
        item = self._items[step]
        staleness = learner_version - item.version
        if staleness > self.admission.max_staleness or staleness < 0:
            raise StalenessViolation(
                f"batch for step {step} sampled with version {item.version} learned with version "
                f"{learner_version}: staleness {staleness} outside [0, {self.admission.max_staleness}]"
            )
        del self._items[step]
        self.next_step += 1
        return item


def staleness_metrics(staleness: list[int], max_staleness: int) -> dict[str, float]:
    """Mean, max and histogram (``staleness_hist_0 .. _eta``, fractions) of per-turn staleness."""
    n = max(len(staleness), 1)
    out = {
        "staleness_mean": sum(staleness) / n,
        "staleness_max": float(max(staleness, default=0)),
    }
    for k in range(max_staleness + 1):
        out[f"staleness_hist_{k}"] = sum(1 for s in staleness if s == k) / n
    return out
