"""The worker-process side of :mod:`rlvr.verifiers.pool`.

A worker sets itself up once (no SIGINT, die with its parent, an ``RLIMIT_AS`` cap,
imports), says ``ready``, then loops: receive a chunk ``(chunk_id, pickled function,
pickled arguments, timeout)``, say ``start`` once the function is loaded, and stream one
``result`` per item. Each item runs under a soft timer (``signal.setitimer`` in this
process's main thread); after a soft timeout the worker can say ``exit`` and leave, so
that nothing an interrupted computation half-wrote is reused. Items that hang in C code,
where the timer's signal is never handled, are the parent's business: it kills the
process. This module imports nothing heavy, so a fresh worker is ready in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to set itself up."""

    memory_limit_bytes: int | None  # RLIMIT_AS of each worker
    preload: tuple[str, ...]  # modules imported before the worker reports ready
    exit_after_timeout: bool  # leave no half-updated cache behind an interrupted item
    warm: tuple[str, ...] = ()  # modules of functions seen so far; imported best effort


class _SoftTimeout(BaseException):  # not Exception: sympy's `except Exception` must not eat it
    """Raised by SIGALRM in a worker when its item's time is up."""


def _raise_soft_timeout(signum: int, frame: object) -> None:
    raise _SoftTimeout


def _die_with_parent() -> None:
    # Linux only, best effort: SIGKILL this worker when its parent (the forkserver, which
    # exits with the pool's process) dies, so a worker stuck in C code is never orphaned.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _setup_worker(config: WorkerConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _die_with_parent()
    if config.memory_limit_bytes:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = config.memory_limit_bytes if hard < 0 else min(config.memory_limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    for name in config.preload:
        importlib.import_module(name)
    for name in config.warm:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    signal.signal(signal.SIGALRM, _raise_soft_timeout)


def _run_one(
    fn: Callable[[Any], Any] | None, fn_error: str, payload: bytes, timeout: float
) -> tuple[str, Any, str]:
    """Run one item under the soft timer; return ``(status, value, error)``, as sent."""
    if fn is None:
        return "error", None, fn_error
    try:
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
        try:
            return "ok", fn(pickle.loads(payload)), ""
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        return "timeout", None, "timed out"
    except BaseException as e:  # noqa: BLE001 - any failure of fn is that item's result
        return "error", None, f"{type(e).__name__}: {e}"[:500]


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Loop: receive a chunk, stream ``start`` then one ``result`` per item."""
    try:
        _setup_worker(config)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which gives up after a few
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        chunk_id, fn_payload, arg_payloads, timeout = message
        fn, fn_error = None, ""
        try:
            fn = pickle.loads(fn_payload)
        except BaseException as e:  # noqa: BLE001 - e.g. the function's module is not importable
            fn_error = f"cannot load function: {type(e).__name__}: {e}"
        conn.send(("start", chunk_id))
        for position, payload in enumerate(arg_payloads):
            status, value, error = _run_one(fn, fn_error, payload, timeout)
            try:
                conn.send(("result", chunk_id, position, status, value, error))
            except Exception as e:  # noqa: BLE001 - an unpicklable return value
                error = f"unpicklable result: {e}"
                conn.send(("result", chunk_id, position, "error", None, error))
            if status == "timeout" and config.exit_after_timeout:
                conn.send(("exit",))
                return
