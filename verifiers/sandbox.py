"""Run an untrusted Python program in a throw-away sandbox and collect what it did.

Each run starts a fresh interpreter (``python -I -S``: no site-packages, no ``PYTHON*``
variables) that executes ``sandbox_harness.py``. The harness sets up isolation, runs the
program (against assert strings, or once per stdin string) and reports on a private pipe.
This module only spawns, reads with caps, kills and parses; scoring lives in ``code.py``.

Assert tests never run in the candidate's interpreter. The harness splits into two
processes: the *evaluator*, which alone holds the result pipe, the run's nonce and the
tests, and which never executes a line of the program; and the *candidate*, which runs the
program and serves calls of its top-level functions and classes over a pipe pair. The
evaluator runs each test with its own builtins and modules, where the candidate's names
are proxies, and rebuilds every reply as exact built-in types (``sandbox_wire.py``: no
pickle, no objects, only None/bool/int/float/complex/str/bytes and tuples, lists, sets,
frozensets and dicts of them). An ``__eq__`` that returns True, an int subclass, a patched
``math.isclose`` or ``builtins.sorted``, or a frame walk in search of the nonce therefore
decides nothing: see ``sandbox_evaluator.py`` for exactly what a test may and may not do.
The candidate holds no capability over the evaluator, which is non-dumpable (its /proc
files and memory are closed even to a process with the same uid); per level below.
Stdin/stdout tests run the program in forked children without the result pipe, and the
expected output never enters the sandbox.

Isolation levels (picked once per process by a probe run, see :func:`isolation_level`;
``RLVR_SANDBOX_ISOLATION`` forces one, ``RLVR_SANDBOX_PYTHON`` picks the interpreter):

``namespaces`` (caller is root, ``unshare`` works; the level used on the project machines)
    ``unshare --net --pid --mount --ipc --uts --fork --kill-child --mount-proc``. The
    program sees no network (only a down loopback), its own PID space and /proc. The
    harness is PID 1 there and stays root; it remounts the whole filesystem read-only
    and nosuid (recursively, ``mount_setattr``), mounts fresh size-capped tmpfs on /tmp
    (the scratch dir, cwd and HOME) and /dev/shm, and forks the process that runs the
    program (for assert tests PID 1 is then the evaluator, for stdin tests it waits). That
    child enters its own user namespace in which only uid/gid 65534
    (nobody) is mapped, drops to it (no supplementary groups, ``no_new_privs``), so it
    has no capability anywhere, cannot touch the mounts, cannot signal PID 1, and no
    setuid binary gives root back. Because the user namespace is per run, RLIMIT_NPROC
    counts this sandbox's processes only (the kernel charges processes per user
    namespace), so concurrent sandboxes do not share one budget. When PID 1 exits or is
    killed, the kernel kills everything left in the namespace and the tmpfs vanish.
``user-namespaces`` (caller is not root but may create user namespaces)
    The same, inside ``unshare --user --map-root-user``; no uid drop (only one uid is
    mapped), so on the host the program has the caller's uid, but it cannot write any
    file (read-only mounts) nor see or signal any process outside its PID namespace. For
    assert tests the candidate gets a user namespace below PID 1's (uid 0 mapped to 0), so
    its capabilities end at its own namespace and do not reach the evaluator (PID 1).
    RLIMIT_NPROC counts all of the caller's processes (and does not apply at all if the
    caller is root, which is why root uses ``namespaces``).
``process-group`` (fallback)
    A new session (``setsid``) with the same rlimits, a fresh ``mkdtemp`` scratch dir as
    cwd and HOME, and SIGKILL to the whole process group when the run ends. As root it
    also drops to uid 65534 (the scratch dir is chowned to it). A keeper process sits
    between the caller and the program so that a naive ``os.kill(os.getppid(), 9)``
    does not hit the caller. For assert tests the candidate is forked after the uid drop,
    so it shares the evaluator's uid; the evaluator is non-dumpable, so the candidate can
    neither read its memory nor open its fds, but it can signal it (the verdict is then
    "crashed", never a pass). Network, filesystem and processes are NOT isolated.

Cost: about 18 ms of CPU per run with namespaces (interpreter start-up dominates; the
mount namespace teardown adds ~10 ms of latency but no CPU), so threads overlap well:
``verify_code_batch`` from 8 threads did ~78 trivial programs/s on this 2-core machine
while other jobs kept it loaded (load average ~6). The evaluator/candidate split costs
about as much CPU as it saves by sending the harness precompiled (same bytecode magic),
plus ~70 us per call of the candidate: ~28 ms of CPU per run before and after, and
HumanEval's 164 canonical solutions at 46-51 verdicts/s before and 49-53 after, measured
side by side at load average 6-7 (``scripts/bench_verifiers.py --only humaneval``).

Always: environment reduced to PATH, LANG and HOME; rlimits on CPU seconds, address space
(RLIMIT_AS), file size, processes and open files; stdout, stderr and the result pipe read
with caps (overflow kills the run); a wall-clock deadline enforced by the caller (never
``signal.alarm``, so any thread and asyncio's ``to_thread`` work). With namespaces, every
process the program started is gone when :func:`run_in_sandbox` returns: the caller
SIGKILLs the namespace's init and waits for ``unshare``, which exits only after the kernel
has torn the namespace down.

What is NOT isolated, at any level:

- Same kernel: this is no boundary against kernel exploits; no seccomp filter.
- Reading: the program can read every world-readable file on the machine.
- CPU and memory are capped per process (RLIMIT_CPU, RLIMIT_AS), not per sandbox; up to
  max_processes processes can each use them. No cgroup. Outside ``namespaces`` the
  process count is per uid, so it is shared with the caller's other processes
  (``user-namespaces``) or with concurrent root-fallback sandboxes (``process-group``).
- Unix sockets on the filesystem (as opposed to abstract ones) are reachable when their
  permissions allow "other"; a network namespace does not cover them.
- What the candidate returns is its own business: the evaluator can only check the data
  it gets back, so a program that special-cases the test inputs it is called with (it
  sees the arguments, never the expected values) is not caught. Helper functions that a
  HumanEval prompt defines (``encode_cyclic`` next to ``decode_cyclic``) are candidate
  code too, and tests call them through the channel like the entry point.
- The evaluator runs the tests' own code with the sandbox's mounts, uid and rlimits but
  outside the candidate's user namespace (PID 1 at the namespace levels): tests are
  trusted input, not model output, and nothing but plain data reaches them.
- ``process-group`` only: network, other processes of the same uid, world-writable paths
  (/tmp, /dev/shm), and children that ``setsid`` away from the group (they survive).
  Without root the program runs as the caller's uid, so it can write whatever the caller
  can, the interpreter's own library included where the caller owns it (a later run's
  evaluator would import what it wrote), and read the caller's memory where ptrace rules
  allow: this level is a fallback, not a boundary.
"""

from __future__ import annotations

import importlib.util
import logging
import marshal
import os
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlvr.verifiers import sandbox_cgroup
from rlvr.verifiers.sandbox_channel import anon_fd, collect, parse_records
from rlvr.verifiers.sandbox_levels import (
    EVALUATOR_UID,
    ISOLATION_LEVELS,
    SANDBOX_UID,
    Backend,
    candidate_backends,
    describe,
    warn_weak_level,
)
from rlvr.verifiers.sandbox_process import remove_tree, terminate

__all__ = [
    "ISOLATION_LEVELS",
    "SANDBOX_UID",
    "EVALUATOR_UID",
    "SandboxError",
    "SandboxLimits",
    "SandboxRun",
    "describe",
    "isolation_level",
    "run_in_sandbox",
    "sandbox_python",
]
logger = logging.getLogger(__name__)

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_HARNESS_SOURCE = Path(__file__).with_name("sandbox_harness.py").read_bytes()
# Helper modules the harness loads from the payload (it imports nothing of rlvr).
_HARNESS_MODULES = {
    name: Path(__file__).with_name(name + ".py").read_text(encoding="utf-8")
    for name in ("sandbox_wire", "sandbox_server", "sandbox_evaluator", "sandbox_confine")
}
# The harness travels in a per-run memfd (argv[1]) rather than in argv, which would put
# kilobytes of code into every `ps` line. When the sandbox's interpreter is this one, it
# travels compiled (marshal of code objects, the trusted direction): compiling ~900 lines
# in every run would cost more CPU than the rest of the harness together.
_BOOTSTRAP = (
    "import sys,marshal;d=open(int(sys.argv[1]),'rb').read();"
    "exec(compile(d,'sandbox_harness.py','exec') if d[:1]==b'\"' else marshal.loads(d))"
)
_RECORD_OVERHEAD = 1024  # bytes of result channel allowed per test beyond captured output

Mode = Literal["asserts", "io"]


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): unshare refused, harness setup failed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource caps for one sandboxed run."""

    timeout: float = 10.0
    """Seconds for the whole run (all tests): the run's own CPU time where it has a cgroup
    (wall-clock backstop: 4x), else wall-clock time; enforced by the caller."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS per process; allocations past it raise MemoryError."""
    sandbox_memory_bytes: int = 1 << 30
    """Memory of the whole run (every process, tmpfs and shared memory), by its cgroup."""
    cpus: float = 1.0
    """CPU quota of the whole run, in CPUs, by its cgroup."""
    max_output_bytes: int = 1 << 20
    """Cap on captured stdout and on stderr (each); more kills the run ("output limit")."""
    max_file_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the program may write."""
    max_processes: int = 64
    """Processes (threads included) of the whole run (cgroup ``pids.max``); also RLIMIT_NPROC."""
    max_open_files: int = 256
    """RLIMIT_NOFILE."""
    scratch_bytes: int = 64 << 20
    """Size of each tmpfs scratch mount, /tmp and /dev/shm (namespace levels)."""


@dataclass(frozen=True)
class SandboxRun:
    """What one sandboxed run produced. ``records`` are trusted only when ``valid``."""

    records: list[dict[str, Any]]
    """Harness records (nonce removed) in order: ready, syntax/program/test/io, done."""
    valid: bool
    """Every line on the result channel carried this run's nonce and parsed."""
    stdout: bytes
    """The sandbox's stdout (asserts mode: the program's prints), capped."""
    stderr: bytes
    """The sandbox's stderr (tracebacks, program's own writes), capped."""
    returncode: int | None
    timed_out: bool
    output_overflow: bool
    """stdout, stderr, the result channel or an io test's stdout went past its cap."""
    elapsed: float
    isolation: str
    memory_exceeded: bool = False
    """The kernel killed a process of the run for the run's memory cap (its cgroup)."""
    cpu_seconds: float | None = None
    """CPU time of the whole run (None without a cgroup)."""

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Return the records of one kind, in order."""
        return [r for r in self.records if r.get("kind") == kind]


_backend_lock = threading.Lock()
_backend_cache: dict[str | None, Backend] = {}  # None: the default level


def isolation_level() -> str:
    """Return the isolation level this process uses: one of :data:`ISOLATION_LEVELS`.

    ``namespaces`` unless ``RLVR_SANDBOX_ISOLATION`` asks for a weaker one; the first call
    checks it by running a tiny program. Raises :class:`SandboxError` when the level does
    not work here (the message says which weaker level may be asked for).
    """
    return _backend().level


def sandbox_python() -> str:
    """Return the interpreter that runs sandboxed programs."""
    return _backend().python


def run_in_sandbox(
    program: str, tests: list[str], *, mode: Mode, limits: SandboxLimits | None = None, isolation: str | None = None
) -> SandboxRun:
    """Run ``program`` against assert strings (``asserts``) or stdin strings (``io``).

    ``isolation`` forces a level (tests use it to cover the weaker ones); by default the
    level of :func:`isolation_level`. Never raises because of what the program does;
    raises :class:`SandboxError` when the sandbox could not be set up (retried once, for
    a transient failure) or the level does not work here.
    """
    backend = _backend(isolation)
    limits = limits or SandboxLimits()
    try:
        return _run(backend, mode, program, tests, limits)
    except SandboxError:
        time.sleep(0.05)
        return _run(backend, mode, program, tests, limits)


def _backend(level: str | None = None) -> Backend:
    with _backend_lock:
        if level not in _backend_cache:
            backend = _probe(level or os.environ.get("RLVR_SANDBOX_ISOLATION") or "namespaces")
            if level is None:
                warn_weak_level(backend)
            _backend_cache[level] = backend
        return _backend_cache[level]


_PROBE_PROGRAM = "import collections, functools, heapq, itertools, math, re, string\n"


def _probe(level: str) -> Backend:
    """Return the first backend of ``level`` whose sandbox runs a program and a test."""
    tried = []
    for backend in candidate_backends(level):
        try:
            run = _run(backend, "asserts", _PROBE_PROGRAM, ["assert True"], SandboxLimits(timeout=30.0))
        except (SandboxError, OSError) as exc:
            tried.append(f"{backend.level} with {backend.python}: {exc}")
            continue
        if run.valid and [r.get("ok") for r in run.of_kind("test")] == [True]:
            return backend
        tried.append(f"{backend.level} with {backend.python}: {run.stderr[-300:]!r}")
    hint = (
        ""
        if level != "namespaces"
        else "\nThe full level needs root and unshare(1). Weaker levels run only when asked "
        "for: RLVR_SANDBOX_ISOLATION=user-namespaces (any user allowed to create user "
        "namespaces) or process-group (isolates nothing but the scratch dir)."
    )
    raise SandboxError(f"no working sandbox at level {level!r}; tried:\n" + "\n".join(tried) + hint)


def _setup(
    backend: Backend, workdir: str, limits: SandboxLimits, cgroup: sandbox_cgroup.Cgroup | None
) -> dict[str, Any]:
    """Return what the harness sets up before the program runs (see sandbox_confine.py)."""
    return {
        "pid_ns": backend.namespaced,
        "keeper": not backend.namespaced,
        "workdir": workdir,
        "scratch_bytes": limits.scratch_bytes,
        "uid": backend.uid,
        "gid": backend.uid,
        "evaluator_uid": backend.evaluator_uid,
        "plan": backend.plan,
        "sys_path": backend.sys_path,
        "seccomp": backend.seccomp,
        "cgroup_procs": cgroup.procs_files if cgroup else [],
    }


def _run(backend: Backend, mode: str, program: str, tests: list[str], limits: SandboxLimits) -> SandboxRun:
    start = time.monotonic()
    namespaced = backend.namespaced
    workdir = "/tmp" if namespaced else tempfile.mkdtemp(prefix="rlvr-sandbox-")
    cgroup = (
        sandbox_cgroup.create(
            sandbox_cgroup.CgroupLimits(limits.sandbox_memory_bytes, limits.max_processes, limits.cpus)
        )
        if namespaced
        else None
    )
    try:
        if not namespaced and backend.uid is not None:
            os.chown(workdir, backend.uid, backend.uid)
        nonce = secrets.token_hex(16)
        # The nonce and the tests travel apart from the program: only the process that
        # reports reads them, after the candidate process has split off (asserts mode).
        secret = {"nonce": nonce, "tests": list(tests)}
        payload = {
            "mode": mode,
            "program": program,
            "modules": _harness(backend.python)[1],
            "output_cap": limits.max_output_bytes,
            "limits": {
                "RLIMIT_CPU": int(limits.timeout) + 2,
                "RLIMIT_AS": limits.memory_bytes,
                "RLIMIT_FSIZE": limits.max_file_bytes,
                "RLIMIT_NPROC": limits.max_processes,
                "RLIMIT_NOFILE": limits.max_open_files,
                "RLIMIT_CORE": 0,
            },
            "setup": _setup(backend, workdir, limits, cgroup),
        }
        if cgroup is not None:
            # pids.max caps the run. RLIMIT_NPROC would count every process of the sandbox
            # uid across all concurrent runs: each user namespace is charged to its owner.
            del payload["limits"]["RLIMIT_NPROC"]
        result_cap = 64 * 1024 + _RECORD_OVERHEAD * len(tests)
        if mode == "io":  # stdout travels as repr(bytes): up to 4 chars per byte
            result_cap += 4 * limits.max_output_bytes
        proc, result_r = _spawn(backend, marshal.dumps(payload), marshal.dumps(secret), workdir)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            streams = collect(
                proc.pid,
                (proc.stdout.fileno(), proc.stderr.fileno(), result_r),
                (limits.max_output_bytes, limits.max_output_bytes, result_cap),
                timeout=limits.timeout,
                start=start,
                namespaced=namespaced,
                clock=cgroup.cpu_seconds if cgroup else None,
            )
        finally:
            os.close(result_r)
            proc.stdout.close()
            proc.stderr.close()
            terminate(proc, namespaced)
        oom = bool(cgroup and cgroup.oom_kills())
        cpu = cgroup.cpu_seconds() if cgroup else None
    finally:
        if cgroup is not None:
            cgroup.remove()
        if not namespaced:
            remove_tree(workdir)
    records, valid = parse_records(streams.result, nonce)
    if valid and not records and not streams.timed_out and not streams.overflow:
        raise SandboxError(f"{backend.level} sandbox did not start (exit {proc.returncode}): {streams.stderr[-500:]!r}")
    if valid and records and records[0].get("kind") == "setup_error":
        raise SandboxError(
            f"{backend.level} sandbox setup failed: {records[0].get('error')} (stderr: {streams.stderr[-500:]!r})"
        )
    return SandboxRun(
        records=records,
        valid=valid,
        stdout=streams.stdout,
        stderr=streams.stderr,
        returncode=proc.returncode,
        timed_out=streams.timed_out,
        output_overflow=streams.overflow,
        elapsed=time.monotonic() - start,
        isolation=backend.level,
        memory_exceeded=oom,
        cpu_seconds=cpu,
    )


_compiled: dict[str, tuple[bytes, dict[str, Any]]] = {}


def _harness(python: str) -> tuple[bytes, dict[str, Any]]:
    """Return the harness and its modules for ``python``, compiled when its bytecode is ours."""
    if python not in _compiled:
        if _bytecode_magic(python) == importlib.util.MAGIC_NUMBER:
            harness = marshal.dumps(compile(_HARNESS_SOURCE, "sandbox_harness.py", "exec"))
            modules = {name: compile(source, name + ".py", "exec") for name, source in _HARNESS_MODULES.items()}
            _compiled[python] = (harness, modules)
        else:
            _compiled[python] = (_HARNESS_SOURCE, dict(_HARNESS_MODULES))
    return _compiled[python]


def _bytecode_magic(python: str) -> bytes | None:
    """Return the bytecode magic number of ``python``, or None if it cannot be asked.

    Same magic, portable code objects: .pyc files are shared across patch releases.
    """
    program = "import sys,importlib._bootstrap_external as b;sys.stdout.write(b.MAGIC_NUMBER.hex())"
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", program], capture_output=True, timeout=30, env={"PATH": _SAFE_PATH}, check=True
        ).stdout
        return bytes.fromhex(out.decode())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _spawn(backend: Backend, payload: bytes, secret: bytes, workdir: str) -> tuple[subprocess.Popen, int]:
    source_fd = anon_fd(_harness(backend.python)[0])
    payload_fd = anon_fd(payload)
    secret_fd = anon_fd(secret)
    result_r, result_w = os.pipe()
    argv = [
        *backend.prefix,
        backend.python,
        "-I",
        "-S",
        "-c",
        _BOOTSTRAP,
        str(source_fd),
        str(payload_fd),
        str(secret_fd),
        str(result_w),
    ]
    env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "HOME": workdir}
    try:
        # pass_fds makes exactly these four inheritable in the child; every other fd of the
        # caller (other threads' pipes included) is O_CLOEXEC, so concurrent spawns are safe.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(source_fd, payload_fd, secret_fd, result_w),
            env=env,
            cwd=workdir if not backend.namespaced else "/",
            start_new_session=True,
        )
    except BaseException:
        os.close(result_r)
        raise
    finally:
        for fd in (source_fd, payload_fd, secret_fd, result_w):
            os.close(fd)
    return proc, result_r
