r"""A pool of killable worker processes with a per-item wall-clock timeout.

Why not ``multiprocessing.Pool`` or ``concurrent.futures.ProcessPoolExecutor``: neither can
take back a task that hangs. Verifiers run sympy and math-verify on model output, and a
completion like ``\boxed{9^{9^{9^{9^{9}}}}}`` asks for a number with more digits than
there are atoms in the universe. A SIGALRM in the worker ends most such work (CPython's
own big-integer code checks for signals), but not all of it: C extensions that sympy uses
when they are installed (gmpy2, python-flint) never look at signals during a call, code
may swallow the exception with a bare ``except``, and a worker can deadlock or crash. The
only bound that always holds is SIGKILL, so this pool owns its processes one by one and
replaces any it kills.

How it works. Callers submit ``(fn, arg)`` items from any thread (or from asyncio through
:meth:`WorkerPool.amap`) and get a ``concurrent.futures.Future`` per item. One dispatcher
thread owns every process and pipe. It sends items to idle workers in chunks (one pickled
function, several arguments) for throughput; a worker streams back one message per item,
so the dispatcher always knows which item a worker is running and since when. Two
timeouts guard an item:

- soft, inside the worker: ``signal.setitimer`` raises in the worker's main thread after
  ``timeout`` seconds, which ends pure-Python loops (most of sympy) at once; the worker
  reports the timeout, then (by default) exits so that a fresh one, with no cache left
  half-written by the interrupted item, takes its place;
- hard, in the dispatcher: after ``timeout + kill_grace`` seconds the worker is SIGKILLed
  and a fresh one is started. The hung item gets a ``timeout`` result; the items of its
  chunk that had not started are put back at the head of the queue and run elsewhere.

The caller's thread never uses ``signal.alarm``, so the pool works from any thread.
Workers are started with the ``forkserver`` context (``fork`` is unsafe once torch has
started threads in the caller), ignore SIGINT (the parent ends them), and run under an
``RLIMIT_AS`` cap so a hostile 100k-character answer cannot eat the machine's memory.

Invariants:

1. Every submitted item gets exactly one result (:class:`ItemResult`): ``ok``, ``error``
   (the function raised), ``timeout``, ``crashed`` (the worker died on that item) or
   ``cancelled`` (the pool was closed first). No future is left pending after ``close``.
2. An item runs at most once: only items that never started are re-queued (the rest of a
   hung chunk; a whole chunk whose worker died before loading it, at most 3 times).
3. No item runs longer than ``timeout + kill_grace`` seconds of wall clock after it starts
   (plus the dispatcher's wake-up latency, milliseconds). Time spent waiting in the queue
   or importing the function's module in a fresh worker does not count.
4. Only the dispatcher thread touches processes and pipes; callers share only a locked
   deque and futures.
5. The pool keeps ``workers`` processes alive or starting; a killed, crashed or retired
   worker is replaced at once. If fresh workers keep dying before they are ready (a broken
   ``preload``), the pool stops retrying and fails the queued items with ``crashed``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from rlvr.verifiers.pool_worker import WorkerConfig, worker_main

Status = Literal["ok", "error", "timeout", "crashed", "cancelled"]
Fn = Callable[[Any], Any]  # module-level (importable by the workers) and picklable

_MAX_STARTUP_FAILURES = 3
_MAX_LOST = 3


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item: ``value`` when ``status == "ok"``, else ``error`` says why."""

    status: Status
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class _Task:
    fn_payload: bytes  # the pickled function, shared by every task of one map() call
    arg_payload: bytes
    timeout: float
    future: Future = field(default_factory=Future)
    lost: int = 0  # times a worker died before starting this task's chunk


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)
    chunk: list[_Task] = field(default_factory=list)
    chunk_id: int = -1
    started: bool = False  # the worker has loaded the chunk's function and begun
    position: int = 0  # index in `chunk` of the item now running
    deadline: float | None = None  # hard deadline of that item (monotonic seconds)
    items_done: int = 0


class WorkerPool:
    """Worker processes that run picklable functions with per-item hard timeouts.

    ``fn`` must be importable by the workers (a module-level function of an installed
    module or a builtin), and its argument and return value picklable.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        memory_limit_mb: int | None = 3072,
        chunk_size: int = 16,
        kill_grace: float = 0.5,
        startup_timeout: float = 120.0,
        preload: Sequence[str] = (),
        max_items_per_worker: int | None = 20_000,
        exit_after_timeout: bool = True,
        start_method: str = "forkserver",
    ) -> None:
        """Start ``workers`` processes (default: the number of CPUs).

        ``memory_limit_mb`` is each worker's address-space cap; ``preload`` names modules
        a worker imports before it reports ready; ``max_items_per_worker`` retires a worker
        after that many items to bound slow leaks (sympy caches, antlr state);
        ``exit_after_timeout`` replaces a worker whose item hit the soft timeout, so that
        no verdict depends on state an interrupted computation left half-written.
        """
        self.workers = max(1, workers or os.cpu_count() or 1)
        self.chunk_size = max(1, chunk_size)
        self.kill_grace = kill_grace
        self.startup_timeout = startup_timeout
        self.max_items_per_worker = max_items_per_worker
        self._ctx = multiprocessing.get_context(start_method)
        self._worker_config = WorkerConfig(
            memory_limit_bytes=memory_limit_mb * 2**20 if memory_limit_mb else None,
            preload=tuple(preload),
            exit_after_timeout=exit_after_timeout,
        )
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: collections.deque[_Task] = collections.deque()
        self._closing = False
        self._broken = ""
        self._startup_error = ""
        self._startup_failures = 0
        self._warm: tuple[str, ...] = ()
        self._chunk_ids = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        self.kills = 0  # workers killed for a timeout (read by tests and benchmarks)
        self.crashes = 0  # workers that died on their own
        self._workers: list[_Worker] = [self._spawn() for _ in range(self.workers)]
        self._thread = threading.Thread(target=self._dispatch, name="rlvr-pool", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API

    def submit_many(self, fn: Fn, args: Sequence[Any], *, timeout: float) -> list[Future]:
        """Queue ``fn(arg)`` for every arg; each future resolves to an :class:`ItemResult`."""
        if os.getpid() != self._owner_pid:
            raise RuntimeError("a WorkerPool cannot be used from a forked child; make a new one")
        fn_payload = pickle.dumps(fn)
        tasks = [_Task(fn_payload, pickle.dumps(arg), float(timeout)) for arg in args]
        module = getattr(fn, "__module__", None)
        with self._lock:
            if isinstance(module, str) and module not in self._warm:
                # Replacement workers import it before they report ready, so a respawn
                # after a timeout never makes the next item wait for a sympy import.
                self._warm += (module,)
            refused = ItemResult("crashed", error=self._broken) if self._broken else None
            if self._closing:
                refused = ItemResult("cancelled", error="pool closed")
            if refused is None:
                self._queue.extend(tasks)
        for task in tasks if refused else []:
            task.future.set_result(refused)
        self._wake()
        return [task.future for task in tasks]

    def submit(self, fn: Fn, arg: Any, *, timeout: float) -> Future:
        return self.submit_many(fn, [arg], timeout=timeout)[0]

    def map(self, fn: Fn, args: Sequence[Any], *, timeout: float) -> list[ItemResult]:
        """Run ``fn`` on every arg and block until all have a result (in order)."""
        return [f.result() for f in self.submit_many(fn, args, timeout=timeout)]

    async def amap(self, fn: Fn, args: Sequence[Any], *, timeout: float) -> list[ItemResult]:
        """Asyncio form of :meth:`map`; the event loop is never blocked."""
        futures = self.submit_many(fn, args, timeout=timeout)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until every worker has started (for benchmarks and tests)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(w.ready for w in list(self._workers)):
                return True
            time.sleep(0.02)
        return False

    def pids(self) -> list[int]:
        return [w.process.pid for w in list(self._workers)]

    def close(self) -> None:
        """Stop the workers; queued and running items get ``cancelled``. Idempotent."""
        with self._lock:
            self._closing = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ dispatcher side

    def _wake(self) -> None:
        # BlockingIOError: a wake-up is already pending (buffer full); OSError: pool closed.
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        config = dataclasses.replace(self._worker_config, warm=self._warm)
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, config),
            name="rlvr-verifier-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _dispatch(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                self._assign_work()
                self._wait_and_handle()
                self._enforce_deadlines()
        except BaseException as e:  # a bug here must not leave callers waiting for ever
            with self._lock:
                self._broken = f"pool dispatcher failed: {type(e).__name__}: {e}"
            raise
        finally:
            self._shutdown()

    def _assign_work(self) -> None:
        with self._lock:
            for worker in self._workers:
                if not self._queue:
                    return
                if worker.ready and not worker.chunk:
                    self._send_chunk(worker, self._take_chunk())

    def _take_chunk(self) -> list[_Task]:
        """Pop up to chunk_size tasks that share a function and timeout (lock held)."""
        # Split the queue evenly across workers so a small batch still uses all of them.
        size = min(self.chunk_size, max(1, -(-len(self._queue) // self.workers)))
        first = self._queue.popleft()
        chunk = [first]
        while self._queue and len(chunk) < size:
            task = self._queue[0]
            if task.fn_payload is not first.fn_payload or task.timeout != first.timeout:
                break
            chunk.append(self._queue.popleft())
        return chunk

    def _send_chunk(self, worker: _Worker, chunk: list[_Task]) -> None:
        worker.chunk, worker.position, worker.chunk_id = chunk, 0, next(self._chunk_ids)
        worker.started = False
        # No deadline until the worker says "start": unpickling the function may import
        # heavy modules (sympy) in a fresh worker, which is not the item's time.
        worker.deadline = time.monotonic() + self.startup_timeout
        message = (worker.chunk_id, chunk[0].fn_payload, [t.arg_payload for t in chunk])
        try:
            worker.conn.send((*message, chunk[0].timeout))
        except (OSError, ValueError):
            pass  # the worker is dead; its sentinel fires and _retire handles the chunk

    def _wait_and_handle(self) -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.deadline is not None]
        startups = [w.started_at + self.startup_timeout for w in self._workers if not w.ready]
        limit = min(deadlines + startups, default=now + 1.0)
        waitables: list[Any] = [self._wake_r]
        for w in self._workers:
            waitables += [w.conn, w.process.sentinel]
        ready = wait(waitables, timeout=max(0.0, limit - now))
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                while self._wake_r.recv(4096):
                    pass
        for worker in list(self._workers):
            if worker.conn in ready:
                self._drain(worker)
            if worker.process.sentinel in ready and worker in self._workers:
                self._drain(worker)
                code = worker.process.exitcode
                self._retire(worker, "crashed", f"worker exited with code {code}")

    def _drain(self, worker: _Worker) -> None:
        """Handle every message the worker has sent so far."""
        try:
            while worker.conn.poll():
                self._handle(worker, worker.conn.recv())
        except (EOFError, OSError):
            pass  # the process is gone; its sentinel reports it

    def _handle(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        now = time.monotonic()
        if kind == "ready":
            worker.ready = True
            self._startup_failures = 0
        elif kind == "exit":  # after a soft timeout; the rest of its chunk never started
            self._retire(worker, None, "")
        elif kind == "failed":  # worker setup raised (bad preload, rlimit refused)
            worker.ready = False
            self._startup_error = message[1]
        elif kind == "start" and message[1] == worker.chunk_id:
            worker.started = True
            worker.deadline = now + worker.chunk[0].timeout + self.kill_grace
        elif kind == "result" and message[1] == worker.chunk_id:
            _, _, position, status, value, error = message
            task = worker.chunk[position]
            task.future.set_result(ItemResult(status, value, error))
            worker.position = position + 1
            worker.items_done += 1
            if worker.position < len(worker.chunk):
                worker.deadline = now + worker.chunk[worker.position].timeout + self.kill_grace
            else:
                worker.chunk, worker.deadline = [], None
                if self.max_items_per_worker and worker.items_done >= self.max_items_per_worker:
                    self._retire(worker, None, "")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now > worker.started_at + self.startup_timeout:
                self._retire(worker, "crashed", "worker did not start in time")
            elif worker.deadline is not None and now > worker.deadline:
                self._drain(worker)  # a result may have arrived just now
                if worker.deadline is not None and time.monotonic() > worker.deadline:
                    self.kills += 1
                    self._retire(worker, "timeout", "timed out; worker killed")

    def _retire(self, worker: _Worker, status: Status | None, error: str) -> None:
        """Kill ``worker``, settle its running item, re-queue the rest, start a new one."""
        if worker not in self._workers:
            return
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        pending = worker.chunk[worker.position :]
        if status == "crashed":
            self.crashes += 1
        if pending and not worker.started and status == "crashed":
            # Died before loading the chunk (killed from outside, or the chunk was sent to a
            # worker already dead): nothing ran, so all of it is retried, a few times at most.
            for task in pending:
                task.lost += 1
            if pending[0].lost < _MAX_LOST:
                status = None
        if pending and status is not None:
            pending[0].future.set_result(ItemResult(status, error=error))
            pending = pending[1:]
        self._startup_failures += 0 if worker.ready else 1
        failed: list[_Task] = []
        with self._lock:
            self._queue.extendleft(reversed(pending))
            self._workers.remove(worker)
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                self._broken = f"workers fail to start: {self._startup_error or error}"
                failed, self._queue = list(self._queue), collections.deque()
            else:
                self._workers.append(self._spawn())
        # Futures are settled outside the lock: their callbacks may call submit().
        for task in failed:
            task.future.set_result(ItemResult("crashed", error=self._broken))

    def _shutdown(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.conn.send(None)  # ask politely; idle workers exit at once
        end = time.monotonic() + 1.0
        unfinished: list[_Task] = []
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, end - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            unfinished += worker.chunk[worker.position :]
            worker.conn.close()
        with self._lock:
            unfinished += self._queue
            self._queue, self._workers = collections.deque(), []
        for task in unfinished:
            if not task.future.done():
                task.future.set_result(ItemResult("cancelled", error="pool closed"))
        self._wake_r.close()
        self._wake_w.close()


# ---------------------------------------------------------------- shared pools

_shared: dict[int, WorkerPool] = {}
_shared_lock = threading.Lock()


def default_workers() -> int:
    """Workers of the shared pool: ``$RLVR_VERIFIER_WORKERS`` or the number of CPUs."""
    return max(1, int(os.environ.get("RLVR_VERIFIER_WORKERS", 0)) or os.cpu_count() or 1)


def shared_pool(workers: int | None = None) -> WorkerPool:
    """Return the process-wide pool with ``workers`` processes, created on first use.

    One pool per distinct size, shared by every thread; all are closed at exit.
    """
    size = workers or default_workers()
    with _shared_lock:
        pool = _shared.get(size)
        if pool is None or pool._closing or pool._broken:
            pool = _shared[size] = WorkerPool(size)
        return pool


def shutdown_shared_pools() -> None:
    with _shared_lock:
        pools = list(_shared.values())
        _shared.clear()
    for pool in pools:
        pool.close()


def _forget_shared_pools_in_child() -> None:
    # A forked child inherits the parent's pool objects but not their dispatcher threads
    # or processes; it must start its own pools rather than write to the parent's pipes.
    global _shared_lock
    _shared.clear()
    _shared_lock = threading.Lock()


atexit.register(shutdown_shared_pools)
os.register_at_fork(after_in_child=_forget_shared_pools_in_child)
