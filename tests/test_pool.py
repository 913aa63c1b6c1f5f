"""The killable worker pool: results, soft and hard timeouts, crashes, threads, asyncio.

The functions the workers run are stdlib callables (``abs``, ``time.sleep``,
``hashlib.pbkdf2_hmac``, ``os._exit``), so they import in a fresh worker with no help.
``hashlib.pbkdf2_hmac`` with a huge iteration count is the stand-in for sympy stuck in C
code: it never returns to the interpreter loop, so the soft SIGALRM timeout cannot fire
and only the hard kill ends it. One test uses a function of this module, to check that
pytest's ``sys.path`` reaches the workers (multiprocessing passes it to each child).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlvr.verifiers.pool import ItemResult, WorkerPool, shared_pool

# Runs for many minutes in C without checking for signals.
HANG_IN_C = functools.partial(hashlib.pbkdf2_hmac, "sha256", b"password", b"salt")
HANG_ITERATIONS = 2**31 - 1  # the largest count pbkdf2 accepts; ~30 min


def record_then_maybe_hang(arg: tuple[str, int, bool]) -> int:
    """Append ``value`` to the file at ``path``; then hang in C if asked."""
    path, value, hang = arg
    with open(path, "a") as f:
        f.write(f"{value}\n")
    if hang:
        HANG_IN_C(HANG_ITERATIONS)
    return value


@pytest.fixture
def pool():
    with WorkerPool(2, kill_grace=0.3, chunk_size=8) as p:
        assert p.wait_ready(60), "workers did not start"
        yield p


def test_every_item_gets_its_own_result_in_order(pool):
    args = list(range(-500, 500))
    results = pool.map(abs, args, timeout=5)
    assert [r.value for r in results] == [abs(a) for a in args]
    assert all(r.status == "ok" for r in results)


def test_function_from_a_test_module_runs_in_workers(pool, tmp_path):
    path = str(tmp_path / "log")
    results = pool.map(record_then_maybe_hang, [(path, i, False) for i in range(5)], timeout=5)
    assert [r.value for r in results] == list(range(5))


@pytest.mark.parametrize(
    "fn, arg, status, error_part",
    [
        pytest.param(int, "x", "error", "ValueError", id="exception-is-error"),
        pytest.param(os._exit, 3, "crashed", "exited with code 3", id="exit-is-crashed"),
        pytest.param(len, 5, "error", "TypeError", id="bad-argument-is-error"),
    ],
)
def test_failures_become_results(pool, fn, arg, status, error_part):
    result = pool.submit(fn, arg, timeout=5).result(timeout=30)
    assert result.status == status
    assert error_part in result.error
    # The pool still works afterwards (a crashed worker was replaced).
    assert [r.value for r in pool.map(abs, [-1, -2, -3], timeout=5)] == [1, 2, 3]


@pytest.mark.parametrize("exit_after_timeout", [True, False], ids=["fresh-worker", "same-worker"])
def test_soft_timeout_needs_no_kill(exit_after_timeout, tmp_path):
    path = str(tmp_path / "log")
    with WorkerPool(1, chunk_size=8, exit_after_timeout=exit_after_timeout) as pool:
        assert pool.wait_ready(60)
        pids = pool.pids()
        start = time.monotonic()
        slept = pool.map(time.sleep, [30, 0], timeout=0.5)
        elapsed = time.monotonic() - start
        assert [r.status for r in slept] == ["timeout", "ok"]
        assert elapsed < 0.5 + 2.0
        assert pool.kills == 0
        assert (pool.pids() != pids) == exit_after_timeout
        # The items after the timed-out one ran exactly once, in whichever worker.
        args = [(path, i, False) for i in range(4)]
        pool.submit(time.sleep, 30, timeout=0.2)
        assert [r.value for r in pool.map(record_then_maybe_hang, args, timeout=5)] == [0, 1, 2, 3]
    with open(path) as f:
        assert sorted(int(line) for line in f) == [0, 1, 2, 3]


def test_hang_in_c_kills_the_worker_and_the_pool_recovers(pool):
    pids = set(pool.pids())
    start = time.monotonic()
    result = pool.submit(HANG_IN_C, HANG_ITERATIONS, timeout=0.5).result(timeout=30)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert 0.5 <= elapsed < 0.5 + 0.3 + 1.5  # timeout + kill grace + slack for a busy CPU
    assert pool.kills == 1
    assert set(pool.pids()) != pids, "the killed worker was not replaced"
    assert [r.value for r in pool.map(abs, [-4, -5], timeout=5)] == [4, 5]


def test_rest_of_a_hung_chunk_runs_once_elsewhere(tmp_path):
    path = str(tmp_path / "log")
    # One worker, one chunk: items after the hung one must be re-queued and run exactly once.
    args = [(path, i, i == 2) for i in range(6)]
    with WorkerPool(1, kill_grace=0.2, chunk_size=16) as pool:
        results = pool.map(record_then_maybe_hang, args, timeout=0.5)
    assert [r.status for r in results] == ["ok", "ok", "timeout", "ok", "ok", "ok"]
    assert [r.value for r in results if r.ok] == [0, 1, 3, 4, 5]
    with open(path) as f:
        runs = sorted(int(line) for line in f)
    assert runs == [0, 1, 2, 3, 4, 5], "an item ran twice or never"


def test_memory_cap_turns_a_huge_allocation_into_an_error():
    with WorkerPool(1, memory_limit_mb=512) as pool:
        result = pool.submit(bytearray, 2 * 2**30, timeout=10).result(timeout=60)
    assert result.status == "error" and "MemoryError" in result.error


def test_four_threads_share_one_pool(pool):
    def work(offset: int) -> list[ItemResult]:
        return pool.map(abs, [-(offset * 1000 + i) for i in range(200)], timeout=5)

    with ThreadPoolExecutor(4) as executor:
        batches = list(executor.map(work, range(4)))
    for offset, results in enumerate(batches):
        assert [r.value for r in results] == [offset * 1000 + i for i in range(200)]


def test_asyncio_does_not_block_the_loop(pool):
    async def main() -> tuple[list[ItemResult], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        results = await pool.amap(time.sleep, [0.3, 0.3], timeout=5)
        tick_task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert [r.status for r in results] == ["ok", "ok"]
    assert ticks >= 5, "the event loop was blocked while waiting for the pool"


def test_close_cancels_queued_items_and_later_submissions():
    pool = WorkerPool(1)
    futures = pool.submit_many(time.sleep, [0.2] * 20, timeout=5)
    pool.close()
    results = [f.result(timeout=10) for f in futures]
    assert {r.status for r in results} <= {"ok", "cancelled"}
    assert results[-1].status == "cancelled"
    assert pool.submit(abs, -1, timeout=1).result(timeout=1).status == "cancelled"


def test_workers_that_cannot_start_fail_items_instead_of_hanging():
    with WorkerPool(1, preload=["no_such_module_for_rlvr_tests"]) as pool:
        result = pool.submit(abs, -1, timeout=5).result(timeout=60)
    assert result.status == "crashed"
    assert "no_such_module_for_rlvr_tests" in result.error


def test_shared_pool_is_one_object_across_threads():
    seen: list[WorkerPool] = []
    lock = threading.Lock()

    def grab() -> None:
        p = shared_pool(2)
        with lock:
            seen.append(p)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in seen}) == 1
    assert seen[0].map(abs, [-7], timeout=5)[0].value == 7
