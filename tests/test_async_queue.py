"""The pipeline's bookkeeping without models: admission, the rollout buffer, the weight transport.

Fast: plain tensors and threads (and one spawned process for the transport's pickling).
"""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
import torch

from rlvr.trainer.algorithm.staleness import (
    Admission,
    RolloutBuffer,
    RolloutItem,
    StalenessViolation,
    staleness_metrics,
)
from rlvr.trainer.weights.shared_memory import SharedMemoryTransport, TransportError

# (eta, step) -> oldest admissible version: max(0, step - 1 - eta)
MIN_VERSION_CASES = {
    "eta0-step1": (0, 1, 0),
    "eta0-step5": (0, 5, 4),
    "eta1-step1": (1, 1, 0),
    "eta1-step5": (1, 5, 3),
    "eta2-step3": (2, 3, 0),
    "eta4-step10": (4, 10, 5),
}


@pytest.mark.parametrize("case", MIN_VERSION_CASES, ids=list(MIN_VERSION_CASES))
def test_min_version_by_hand(case):
    eta, step, want = MIN_VERSION_CASES[case]
    admission = Admission(eta)
    assert admission.min_version(step) == want
    assert admission.admits(step, want) and not (want > 0 and admission.admits(step, want - 1))
    assert Admission.staleness(step, want) <= eta


def test_negative_staleness_bound_is_rejected():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        Admission(-1)


def _item(step, version):
    return RolloutItem(step=step, version=version, payload=f"batch {step}")


def test_buffer_hands_out_each_step_once_in_order():
    buffer = RolloutBuffer(Admission(2))
    for step, version in [(1, 0), (2, 0), (3, 0)]:
        buffer.put(_item(step, version))
    assert len(buffer) == 3
    assert buffer.take(1, learner_version=0).payload == "batch 1"
    assert buffer.take(2, learner_version=1).version == 0
    with pytest.raises(StalenessViolation, match="arrived twice"):
        buffer.put(_item(2, 1))
    with pytest.raises(StalenessViolation, match="out of order"):
        buffer.take(4, learner_version=2)
    assert buffer.take(3, learner_version=2).step == 3
    with pytest.raises(KeyError):
        buffer.take(4, learner_version=3)  # not arrived yet: the caller waits


# Each case: batches put in order, the last one must be refused with this message.
PUT_VIOLATIONS = {
    "duplicate-step": ([(1, 0), (1, 0)], "arrived twice"),
    "admission-skipped": ([(1, 0), (2, 0), (3, 0), (4, 0)], "admission was skipped"),
    "older-weights-later": ([(1, 0), (2, 1), (3, 0)], "went back to older weights"),
    "more-than-eta-plus-one": ([(1, 0), (2, 0), (3, 1), (4, 2)], "more than max_staleness + 1"),
}


@pytest.mark.parametrize("case", PUT_VIOLATIONS, ids=list(PUT_VIOLATIONS))
def test_buffer_refuses_batches_that_break_the_invariants(case):
    batches, message = PUT_VIOLATIONS[case]
    buffer = RolloutBuffer(Admission(2))
    for step, version in batches[:-1]:
        buffer.put(_item(step, version))
    with pytest.raises(StalenessViolation, match=re.escape(message)):
        buffer.put(_item(*batches[-1]))


def test_take_refuses_a_batch_too_stale_for_the_learner():
    # Admissible when put (version 0 for step 2 with eta 1), but the learner reports version 3.
    buffer = RolloutBuffer(Admission(1), first_step=2)
    buffer.put(_item(2, 0))
    with pytest.raises(StalenessViolation, match="staleness 3 outside"):
        buffer.take(2, learner_version=3)


def test_staleness_metrics_by_hand():
    got = staleness_metrics([0, 1, 1, 2], max_staleness=2)
    assert got == {
        "staleness_mean": 1.0,
        "staleness_max": 2.0,
        "staleness_hist_0": 0.25,
        "staleness_hist_1": 0.5,
        "staleness_hist_2": 0.25,
    }


class _Board:
    """Published versions for the threaded simulation (what the weight transport does)."""

    def __init__(self):
        self.version = 0
        self.cond = threading.Condition()

    def publish(self, version):
        with self.cond:
            self.version = version
            self.cond.notify_all()

    def wait_for(self, version):
        with self.cond:
            assert self.cond.wait_for(lambda: self.version >= version, timeout=10), "producer starved"
            return self.version


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
def test_threaded_pipeline_keeps_every_invariant(eta):
    """A producer and a learner thread with random stage times, admission as the generator does it."""
    steps, rng = 40, random.Random(eta)
    delays = [(rng.uniform(0, 2e-3), rng.uniform(0, 2e-3)) for _ in range(steps + 1)]
    board, inbox = _Board(), []
    lock = threading.Lock()
    admission = Admission(eta)

    def produce():
        for step in range(1, steps + 1):
            version = board.wait_for(admission.min_version(step))  # wait, then take the newest
            time.sleep(delays[step][0])
            with lock:
                inbox.append(_item(step, version))

    producer = threading.Thread(target=produce)
    producer.start()
    buffer, learned, most_buffered = RolloutBuffer(admission), [], 0
    for step in range(1, steps + 1):
        while not buffer.has(step):
            with lock:
                arrived, inbox[:] = list(inbox), []
            for item in arrived:
                buffer.put(item)  # raises on any broken invariant
            most_buffered = max(most_buffered, len(buffer))
            time.sleep(1e-4)
        learned.append(buffer.take(step, learner_version=step - 1))
        time.sleep(delays[step][1])
        board.publish(step)
    producer.join(timeout=10)
    assert [i.step for i in learned] == list(range(1, steps + 1))
    stale = [Admission.staleness(i.step, i.version) for i in learned]
    assert max(stale) <= eta and min(stale) >= 0
    assert [i.version for i in learned] == sorted(i.version for i in learned)
    assert most_buffered <= eta + 1
    if eta == 0:
        assert stale == [0] * steps  # the synchronous schedule
    else:
        assert max(stale) >= 1  # the producer did run ahead


class _Receiver:
    """A ``Generator`` that keeps what it receives (the transport's client side, no model)."""

    def __init__(self):
        self.version, self.weights = -1, {}

    def update_weights(self, state_dict, version):
        self.weights = {k: v.clone() for k, v in state_dict.items()}
        self.version = version


def _weights(value: float, size: int = 1000) -> dict[str, torch.Tensor]:
    return {"a": torch.full((size,), value), "b.weight": torch.full((size, 3), value), "c": torch.full((2,), value)}


def test_transport_round_trip_keeps_names_shapes_and_version():
    transport = SharedMemoryTransport(_weights(0.0), threading.Lock())
    assert transport.latest_version() == -1
    assert not transport.wait_for_version(0, timeout=0.01)
    transport.publish(_weights(1.5), version=0)
    transport.publish(_weights(2.5), version=1)
    receiver = _Receiver()
    assert transport.receive(receiver) == 1 and receiver.version == 1
    for name, tensor in _weights(2.5).items():
        assert torch.equal(receiver.weights[name], tensor), name
    with pytest.raises(TransportError, match="versions only grow"):
        transport.publish(_weights(0.0), version=1)


def test_transport_stores_tied_parameters_once():
    shared = torch.ones(4, 2)
    transport = SharedMemoryTransport({"embed.weight": shared, "lm_head.weight": shared, "norm": torch.ones(2)}, None)
    assert [e.name for e in transport._entries] == ["embed.weight", "norm"]


def test_concurrent_reads_never_see_a_torn_copy():
    """The writer publishes as fast as it can; every copy a reader keeps is one whole version."""
    size = 200_000  # large enough that copies overlap publishes
    transport = SharedMemoryTransport(_weights(0.0, size), threading.Lock(), poll_interval=0.0)
    transport.publish(_weights(0.0, size), version=0)
    done, seen, torn = threading.Event(), [], []

    def read():
        receiver = _Receiver()
        while not done.is_set():
            version = transport.receive(receiver)
            values = torch.cat([t.flatten() for t in receiver.weights.values()])
            if not bool((values == float(version)).all()):
                torn.append(version)
            seen.append(version)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    for version in range(1, 200):
        transport.publish(_weights(float(version), size), version=version)
    done.set()
    for r in readers:
        r.join(timeout=10)
    assert not torn, f"torn copies kept for versions {torn[:5]}"
    assert len(set(seen)) > 5  # the readers did follow the writer


def _child_receive(transport, out):
    receiver = _Receiver()
    assert transport.wait_for_version(3, timeout=20)
    out.put((transport.receive(receiver), float(receiver.weights["a"][0])))


def test_transport_crosses_a_spawned_process():
    ctx = torch.multiprocessing.get_context("spawn")
    transport = SharedMemoryTransport(_weights(0.0), ctx.Lock())
    transport.publish(_weights(0.0), version=0)
    out = ctx.Queue()
    child = ctx.Process(target=_child_receive, args=(transport, out))
    child.start()
    for version in (1, 2, 3):
        transport.publish(_weights(float(version)), version=version)
    version, value = out.get(timeout=60)
    child.join(timeout=10)
    assert child.exitcode == 0
    assert (version, value) == (3, 3.0)


def test_transport_ring_holds_the_last_slots_versions_and_reads_the_oldest_admissible():
    """The fixed lag: a reader naming version v gets v itself while it is held, else the oldest newer one."""
    transport = SharedMemoryTransport(_weights(0.0), threading.Lock(), slots=3)
    for version in (0, 1, 2):
        transport.publish(_weights(float(version)), version=version)
    receiver = _Receiver()
    assert transport.receive(receiver, oldest=1) == 1 and float(receiver.weights["a"][0]) == 1.0
    assert transport.receive(receiver, oldest=0) == 0 and float(receiver.weights["c"][1]) == 0.0
    assert transport.receive(receiver) == 2  # no bound: the newest, as before
    transport.publish(_weights(3.0), version=3)  # overwrites version 0's slot
    assert transport.held_versions() == [1, 2, 3]
    assert transport.receive(receiver, oldest=0) == 1
    snapshot = transport.snapshot(2)
    transport.publish(_weights(4.0), version=4)  # the snapshot is a copy, not a view of the slot
    assert all(bool((t == 2.0).all()) for t in snapshot.values())
    with pytest.raises(TransportError, match="version 1 is not held"):
        transport.snapshot(1)
    with pytest.raises(ValueError, match="slots must be >= 2"):
        SharedMemoryTransport(_weights(0.0), threading.Lock(), slots=1)
