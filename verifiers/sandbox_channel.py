"""Reading a sandbox run: capped streams, the fair deadline, and the result channel.

Split from ``sandbox.py`` (which plans and starts a run). :func:`collect` reads stdout,
stderr and the result pipe until they close, a cap is passed, or time is up. Time is the
run's own CPU time where the run has a cgroup (``clock``), so that a busy neighbour cannot
time out an honest program, with a wall-clock backstop several times the limit for a
program that sleeps; without a cgroup it is wall-clock time.
"""

from __future__ import annotations

import ast
import os
import selectors
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlvr.verifiers.sandbox_process import exited, signal_group

EXIT_GRACE = 0.5  # seconds to drain pipes after the sandbox's main process has exited
WALL_FACTOR = 4.0  # wall-clock backstop, in multiples of the limit, when CPU time is the clock


def anon_fd(data: bytes) -> int:
    """Return a readable fd holding ``data`` (a memfd: no size cap, no writer thread)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("rlvr-sandbox")
    else:
        fd, path = tempfile.mkstemp(prefix="rlvr-sandbox-")
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@dataclass
class Streams:
    stdout: bytes
    stderr: bytes
    result: bytes
    timed_out: bool
    overflow: bool


def collect(
    pid: int,
    fds: tuple[int, int, int],
    caps: tuple[int, int, int],
    *,
    timeout: float,
    start: float,
    namespaced: bool,
    clock: Callable[[], float] | None = None,
) -> Streams:
    """Read stdout, stderr and the result pipe (``fds``) until EOF, time is up, or a cap.

    ``clock`` returns the run's CPU seconds (its cgroup); None: wall-clock time counts.
    """
    bufs = {fd: bytearray() for fd in fds}
    limit = dict(zip(fds, caps))
    backstop = start + (timeout * WALL_FACTOR if clock is not None else timeout)
    exited_at = None
    timed_out = overflow = False
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not overflow:
            now = time.monotonic()
            if now >= backstop or (clock is not None and clock() >= timeout):
                timed_out = True
                break
            if exited_at is None and exited(pid):
                exited_at = now
                if not namespaced:  # leftovers in the group would hold the pipes open
                    signal_group(pid)
            if exited_at is not None and now - exited_at > EXIT_GRACE:
                break  # something that escaped the group still holds a pipe open
            for key, _ in sel.select(min(backstop - now, 0.05 if clock else 0.1)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if len(bufs[key.fd]) > limit[key.fd]:
                    overflow = True
    return Streams(*(bytes(bufs[fd]) for fd in fds), timed_out, overflow)


def parse_records(data: bytes, nonce: str) -> tuple[list[dict[str, Any]], bool]:
    """Parse the result channel; ``valid`` is False if any line was not ours."""
    records: list[dict[str, Any]] = []
    valid = True
    token = nonce.encode()
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        # Check for the nonce before parsing so that guessed lines never reach the parser.
        if not line.startswith(b"{") or token not in line:
            valid = False
            continue
        try:
            record = ast.literal_eval(line.decode("utf-8"))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            valid = False
            continue
        if not isinstance(record, dict) or record.pop("nonce", None) != nonce:
            valid = False
            continue
        records.append(record)
    return records, valid
