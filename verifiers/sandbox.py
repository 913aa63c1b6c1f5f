"""Run an untrusted Python program in a throw-away sandbox and collect what it did.

Each run starts a fresh interpreter (``python -I -S``: no site-packages, no ``PYTHON*``
variables) that executes ``sandbox_harness.py``. The harness sets up isolation, runs the
program (against assert strings, or once per stdin string) and reports on a private pipe.
This module plans, spawns, reads with caps, kills and parses; scoring lives in ``code.py``.

Assert tests never run in the candidate's interpreter. The harness splits into the
*evaluator*, which alone holds the result pipe, the run's nonce and the tests and never
executes a line of the program, and the *candidate*, which runs the program and serves
calls of its top-level names over a pipe pair. The evaluator runs each test with its own
builtins and modules, where the candidate's names are proxies, and rebuilds every reply as
exact built-in types (``sandbox_wire.py``); ``sandbox_evaluator.py`` says exactly what a
test may do. Stdin/stdout tests run the program in forked candidates without the result
pipe, and the expected output never enters the sandbox.

Levels (``namespaces`` unless ``RLVR_SANDBOX_ISOLATION`` or ``isolation=`` asks for a
weaker one; a weaker level is never picked silently: it is named, with what it leaves
open, in a warning and in ``scripts/verify.py``'s summary; see ``sandbox_levels.py``):

``namespaces`` (root; the level of the project machines)
    ``unshare --net --pid --mount --ipc --uts``. PID 1 (the harness, root) joins the run's
    cgroup, builds an **empty root** (``sandbox_fs.py``, ``sandbox_confine.py``): read-only
    binds of the interpreter, its standard library and the folders of the shared
    libraries it loads, ``/dev/{null,zero,urandom}``, its own ``/proc``, and tmpfs
    ``/tmp`` and ``/dev/shm`` of ``scratch_bytes`` (64 MiB) each; then ``pivot_root``. No
    other host file is visible: no dataset, test file, home folder or token
    (``RLVR_SANDBOX_PATHS`` adds paths, e.g. a site-packages for numpy). Each candidate
    becomes host uid ``RLVR_SANDBOX_UID`` (65533; unprivileged, so what it uses is charged
    to it, not to root), enters its own user namespace, drops every capability, sets
    ``no_new_privs`` and loads a libseccomp filter (``sandbox_seccomp.py``: no mount, no
    new namespace, no setns, keyctl, bpf, ptrace, perf_event_open, inotify, ...). The
    evaluator runs as uid 65534 with CAP_KILL only, ignores signals, and is non-dumpable,
    so the candidate can neither signal it nor read its memory. The run's **cgroup**
    (``sandbox_cgroup.py``) caps the whole run: ``sandbox_memory_bytes`` (1 GiB, tmpfs and
    shared memory included, no swap), ``max_processes`` (64, ``pids.max``) and ``cpus``
    (1.0 CPU, CFS quota); the time limit counts the run's **own CPU time** (a busy
    neighbour cannot time out an honest program), with a wall-clock backstop of 4x for a
    program that sleeps. Where no cgroup can be made this is said once (a warning) and
    memory, processes and CPU are capped per process only, with a wall-clock limit.
``user-namespaces`` (asked for; any user allowed to create user namespaces)
    The same inside ``unshare --user --map-root-user``: empty root, no capability, filter.
    Not isolated: the candidate has the caller's uid on the host (its processes count
    against the caller's limits, RLIMIT_NPROC included); no cgroup unless one is delegated
    (``RLVR_SANDBOX_CGROUP``), so the caps are per process and the limit is wall-clock.
``process-group`` (asked for; isolates nothing)
    A new session, a scratch dir from ``mkdtemp``, the rlimits, SIGKILL to the group at the
    end; as root both roles drop to uid 65534. The program sees the network, every file
    its uid can read, other processes of its uid; children that ``setsid`` away survive.

Always: environment reduced to PATH, LANG and HOME; rlimits per process on CPU seconds
(timeout + 2), address space (``memory_bytes``, 1 GiB), file size (16 MiB), open files
(256), no core files; stdout, stderr (1 MiB each) and the result pipe read with caps
(overflow kills the run); every process of a namespaced run is gone when
:func:`run_in_sandbox` returns (the caller SIGKILLs the namespace's init and waits for
``unshare``, which exits after the kernel has torn the namespace down), and its cgroup
is removed.

Not isolated at any level: the kernel (a kernel exploit is out of scope: no VM);
filesystem Unix sockets reachable through bound paths (none are bound by default); what
the candidate returns is its own business, so a program that special-cases the inputs it
is called with is not caught; the evaluator runs the tests' own code (trusted input) with
the sandbox's mounts and limits.

Cost (``scripts/bench_verifiers.py --only code,humaneval``, 2 cores, load 2-5, side by
side with the previous sandbox): 67-69 trivial programs/s (was 73-80) and HumanEval's 164
canonical solutions at 50-58 verdicts/s (was 69-79): mounts, cgroup and the user
namespace of each candidate add a few ms of CPU per run.
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


def _payload(backend: Backend, mode: str, program: str, limits: SandboxLimits, setup: dict) -> dict[str, Any]:
    """Return what the harness reads first: mode, program, its helper modules, rlimits, setup."""
    rlimits = {
        "RLIMIT_CPU": int(limits.timeout) + 2,
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_FSIZE": limits.max_file_bytes,
        "RLIMIT_NPROC": limits.max_processes,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
    }
    if setup["cgroup_procs"]:
        # pids.max caps the run. RLIMIT_NPROC would count every process of the sandbox
        # uid across all concurrent runs: each user namespace is charged to its owner.
        del rlimits["RLIMIT_NPROC"]
    return {
        "mode": mode,
        "program": program,
        "modules": _harness(backend.python)[1],
        "output_cap": limits.max_output_bytes,
        "limits": rlimits,
        "setup": setup,
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
        payload = _payload(backend, mode, program, limits, _setup(backend, workdir, limits, cgroup))
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
