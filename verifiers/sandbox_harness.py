"""The script that runs inside the sandbox: set up isolation, run the program, report.

``rlvr.verifiers.sandbox`` starts ``python -I -S -c <bootstrap> SOURCE_FD PAYLOAD_FD
SECRET_FD RESULT_FD``; the bootstrap execs this file from SOURCE_FD (source, or a
marshal-ed code object when the caller runs the same bytecode; it is never imported).
PAYLOAD_FD holds a ``marshal``-ed dict written by the caller (the trusted direction): the
mode, the program, the limits and the helper modules (``sandbox_wire``, ``sandbox_server``,
``sandbox_evaluator``, registered in ``sys.modules`` by :func:`_load`). SECRET_FD holds
the run's nonce and the tests; only the process that reports reads it. RESULT_FD is the
write end of a private pipe on which that process writes one ``repr``-ed dict per line,
each carrying the nonce. The caller accepts only lines with the nonce, so a program that
prints "passed", writes fake records, exits early or kills itself never produces a pass.

Modes:

- ``asserts``: the harness splits (see :func:`_setup`) into the candidate, which closes
  SECRET_FD and RESULT_FD before it runs the program and then serves calls
  (``sandbox_server.py``), and the evaluator, which reads the tests, runs them with
  proxies for the candidate's names and writes one record per test
  (``sandbox_evaluator.py``). The candidate never holds the nonce, the tests or the
  result pipe, and cannot reach the evaluator's memory or fds.
- ``io``: for each stdin string, fork a child that closes RESULT_FD and runs the program as
  ``__main__`` with that stdin; this process captures the child's stdout (capped) and
  sends it back raw. The comparison with the expected output happens in the caller; the
  expected outputs never enter the sandbox.

Kept import-light (no json, re, ast, traceback, tempfile: each costs milliseconds, and start-up
is most of the cost of a sandboxed run) and compatible with Python 3.8+, since it may run
under a system interpreter older than the caller's.
"""

import builtins
import marshal
import os
import resource
import select
import signal
import sys

_write = os.write  # bound before user code runs: monkeypatching os.write must not mute us
_repr = repr
_MAX_MESSAGE = 300
_EXIT_SETUP_FAILED = 70
_EXIT_MEMORY = 86  # io child: uncaught MemoryError (code.py maps it to "memory limit")
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[_write(fd, view) :]


def _libc():
    import ctypes  # only here: ~2 ms, needed only when mounting or dropping privileges

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _check(ctypes, rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _set_limits(limits):
    for name, value in limits.items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:  # an unprivileged caller may not raise it
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


_SIGNALS_IGNORED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _ignore_signals(ignore):
    """Ignore what a program could send the reporting process; give a candidate the defaults."""
    for name in _SIGNALS_IGNORED:
        if hasattr(signal, name):
            handler = signal.SIG_IGN if ignore else signal.SIG_DFL
            signal.signal(getattr(signal, name), handler)
    if not ignore:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _setup(setup, limits, split, before_fork, after_fork, sources):
    """Namespaces, scratch dir, rlimits, privileges; returns (role, candidate pid).

    Roles: "single" reports and forks one candidate per stdin string (io mode), "candidate"
    runs the program (asserts mode) and "evaluator" runs the tests (asserts mode, never
    the program). ``after_fork(pid)`` runs in both processes right after the
    evaluator/candidate split, before anything else; ``before_fork()`` right before it.
    At the namespace levels this process is the PID namespace's init: it builds the empty
    root and stays the reporter; each candidate drops every privilege on its own
    (``sandbox_confine.py``). Raises on failure.
    """
    if not setup["pid_ns"]:
        return _setup_fallback(setup, limits, split, before_fork, after_fork)
    confine = _load(sources, "sandbox_confine")
    confine.join_cgroups(setup["cgroup_procs"])
    confine.protect_init()
    confine.build_root(setup)
    os.chdir(setup["workdir"])
    _ignore_signals(True)
    _set_limits(limits)
    if not split:
        return "single", None
    before_fork()
    pid = os.fork()
    after_fork(pid)
    if pid == 0:
        _become_candidate(setup)
        return "candidate", 0
    confine.become_evaluator(setup)
    ctypes, libc = _libc()
    _check(ctypes, libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    return "evaluator", pid


def _become_candidate(setup):
    """In a forked candidate (namespace levels): no privilege left, default signals."""
    if setup["pid_ns"]:
        sys.modules["sandbox_confine"].become_candidate(setup)
    _ignore_signals(False)
    sys.path.extend(setup["sys_path"])


def _setup_fallback(setup, limits, split, before_fork, after_fork):
    """process-group (asked for): a new session, a keeper, the uid drop; no namespaces."""
    ctypes = libc = None
    role, pid = "single", None
    if setup["uid"] is not None or split:
        ctypes, libc = _libc()
    if setup["keeper"]:
        _keep()
    os.chdir(setup["workdir"])
    _set_limits(limits)
    if setup["uid"] is not None:  # the evaluator too: it needs no privilege to run tests
        os.setgroups([])
        os.setgid(setup["gid"])
        os.setuid(setup["uid"])
    if split:  # same uid, split after the drop
        before_fork()
        pid = os.fork()
        after_fork(pid)
        role = "candidate" if pid == 0 else "evaluator"
    _ignore_signals(role != "candidate")
    if libc is not None:
        _check(ctypes, libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # Changing uid (and fork) clears the parent-death signal; re-arm it: outside a PID
        # namespace it is what ends the run if our parent dies.
        _check(ctypes, libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if role == "evaluator":
        _check(ctypes, libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    return role, pid


def _exit_like(pid):
    """Wait for child ``pid`` and exit with its status (128 + signal if it was killed)."""
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _keep():
    """Fallback mode: stay behind as the program's parent, so `kill(getppid())` hits us."""
    pid = os.fork()
    if pid != 0:
        _exit_like(pid)


def _load(sources, name):
    """Compile and register one of the helper modules whose source came in the payload."""
    module = type(sys)(name)
    code = sources[name]  # a code object when the caller runs this same interpreter
    exec(compile(code, name + ".py", "exec") if type(code) is str else code, module.__dict__)
    sys.modules[name] = module
    return module


def _evaluate(sources, tests, channel_fds, pid, emit):
    """Run the evaluator role: hear how the program went, run the tests, end the candidate."""
    evaluator = _load(sources, "sandbox_evaluator")
    request_fd, reply_fd = channel_fds
    channel = evaluator.Channel(request_fd, reply_fd, pid)
    try:
        started = channel.receive()
    except evaluator.CandidateGone as exc:  # before any user code: the sandbox's fault
        emit(kind="setup_error", error="the candidate process failed to start: " + str(exc))
        os._exit(_EXIT_SETUP_FAILED)
    try:
        hello = channel.receive() if started.get("started") is True else {}
    except evaluator.CandidateGone as exc:
        emit(
            kind="program",
            ok=False,
            error=wire.short(str(exc)) + " before the tests ran",
            memory=False,
            reason=exc.reason,
        )
        return
    kind = hello.get("hello")
    error = wire.short(str(hello.get("error")))
    if kind == "syntax":
        emit(kind="syntax", error=error)
    elif kind == "program":
        emit(kind="program", ok=False, error=error, memory=hello.get("memory") is True)
    elif kind == "ok":
        emit(kind="program", ok=True)
        evaluator.run_tests(tests, channel, hello.get("names"), emit)
    else:
        emit(kind="program", ok=False, error="the candidate broke the channel protocol", memory=False, reason="crashed")
    os.close(request_fd)  # the candidate's server sees EOF, flushes its output and exits
    if channel.gone is None:
        _reap(pid, reply_fd, 0.5)


def _reap(pid, reply_fd, grace):
    """Wait up to ``grace`` seconds for the candidate to exit, then SIGKILL and reap it.

    Its exit shows as EOF on the reply pipe, whose write end only it (and its children) hold.
    """
    for _ in range(16):  # bytes after the last reply are the candidate's: drop a few reads
        ready, _, _ = select.select([reply_fd], [], [], grace)
        if not ready or not os.read(reply_fd, 1 << 16):
            break
    if os.waitpid(pid, os.WNOHANG)[0] == pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)


def _candidate(sources, program, channel_fds):
    """Candidate role: run the program and serve calls; never returns."""
    server = _load(sources, "sandbox_server")
    request_fd, reply_fd = channel_fds
    server._send(reply_fd, {"started": True})  # setup is over: what follows is the program's
    server.serve(program, request_fd, reply_fd)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)  # skip atexit handlers the program may have registered


def _child_main(code, program, child_limits):
    """In a forked child: run the program as __main__ on fds 0/1; never returns."""
    status = 0
    try:
        _set_limits(child_limits)
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.argv = ["program"]
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        status = _EXIT_MEMORY if isinstance(exc, MemoryError) else 1
        try:
            sys.stderr.write(wire.describe(exc, "<program>", program) + "\n")
        except BaseException:
            pass
    try:
        sys.stdout.flush()
    except BaseException:
        status = status or 1
    os._exit(status & 0xFF)


def _stdin_fd(data, workdir):
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin")
    else:  # not Linux: an unlinked file in the scratch dir
        path = os.path.join(workdir, ".stdin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)
    _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _reap_strays(pid_ns):
    """In our own PID namespace, end every process but us (we are init) and reap them."""
    if not pid_ns:
        return  # outside a namespace kill(-1) would hit the whole user: the caller kills the group
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _capture(read_fd, pid, cap, pid_ns):
    """Read the child's stdout up to ``cap`` bytes; returns (bytes, overflow, wait status)."""
    data = bytearray()
    status = None
    overflow = False
    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.05)
        if not ready and status is not None and not pid_ns:
            break  # a leftover grandchild holds the pipe; the caller kills the group later
        if ready:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            data += chunk
            if len(data) > cap:
                overflow = True
                os.kill(pid, signal.SIGKILL)
                break
        elif status is None:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done == pid:  # exited, but a grandchild may still hold the pipe open
                status = wait_status
                _reap_strays(pid_ns)
    os.close(read_fd)
    if status is None:
        status = os.waitpid(pid, 0)[1]
    return bytes(data[:cap]), overflow, status


def _io_child_setup(setup, ready_w):
    """In an io child: become the candidate, then say so on ``ready_w``; never fails silently."""
    try:
        _become_candidate(setup)
    except BaseException as exc:
        os.write(2, ("sandbox setup failed: " + wire.short(repr(exc)) + "\n").encode())
        os._exit(_EXIT_SETUP_FAILED)
    os.write(ready_w, b"1")
    os.close(ready_w)


def _run_io(program, inputs, emit, result_fd, setup, cap, child_limits):
    try:
        code = compile(program, "<program>", "exec")
    except BaseException as exc:
        emit(kind="syntax", error=wire.describe(exc, "<program>", program))
        return
    for index, text in enumerate(inputs):
        in_fd = _stdin_fd(text.encode("utf-8", "surrogatepass"), setup["workdir"])
        read_fd, write_fd = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_fd)
            os.close(read_fd)
            os.close(ready_r)
            _io_child_setup(setup, ready_w)
            os.dup2(in_fd, 0)
            os.dup2(write_fd, 1)
            _child_main(code, program, child_limits)
        os.close(write_fd)
        os.close(in_fd)
        os.close(ready_w)
        ready = os.read(ready_r, 1)
        os.close(ready_r)
        if ready != b"1":  # before any user code: the sandbox's fault, not the program's
            emit(kind="setup_error", error="the candidate process failed to start")
            os._exit(_EXIT_SETUP_FAILED)
        out, overflow, status = _capture(read_fd, pid, cap, setup["pid_ns"])
        cap -= len(out)
        if os.WIFEXITED(status):
            exit_code = os.WEXITSTATUS(status)
        else:
            exit_code = -os.WTERMSIG(status)
        _reap_strays(setup["pid_ns"])
        emit(kind="io", index=index, exit=exit_code, stdout=out, overflow=overflow)
        if overflow:
            return


def main():
    global wire
    payload_fd, secret_fd, result_fd = (int(arg) for arg in sys.argv[2:5])
    payload = marshal.loads(_read_all(payload_fd))
    os.close(payload_fd)
    mode = payload["mode"]
    sources = payload["modules"]
    wire = _load(sources, "sandbox_wire")
    secret = {}  # nonce and tests: read only by the process that reports (never the candidate)
    split = mode == "asserts"
    ends = {}

    def open_channel():  # the private channel: requests to the candidate, replies back
        ends["request_r"], ends["request_w"] = os.pipe()
        ends["reply_r"], ends["reply_w"] = os.pipe()

    def read_secret():
        secret.update(marshal.loads(_read_all(secret_fd)))
        os.close(secret_fd)

    def after_fork(pid):
        if not split:
            return
        keep = ("request_r", "reply_w") if pid == 0 else ("request_w", "reply_r")
        for name in [n for n in ends if n not in keep]:
            os.close(ends.pop(name))
        if pid == 0:
            secret["candidate"] = True
            os.close(secret_fd)
            os.close(result_fd)
        else:
            read_secret()

    def emit(**record):
        record["nonce"] = secret["nonce"]
        _write_all(result_fd, (_repr(record) + "\n").encode("utf-8", "backslashreplace"))

    try:
        limits = dict(payload["limits"])
        # In io mode the file-size cap waits for the child, so that the harness can put
        # a stdin bigger than the cap into its memfd.
        child_limits = {"RLIMIT_FSIZE": limits.pop("RLIMIT_FSIZE")} if mode == "io" else {}
        role, pid = _setup(payload["setup"], limits, split, open_channel, after_fork, sources)
    except BaseException as exc:
        message = wire.short(f"{type(exc).__name__}: {exc}")
        if secret.get("candidate"):  # no result channel here: the evaluator reports it
            os.write(2, ("sandbox setup failed: " + message + "\n").encode())
            os._exit(_EXIT_SETUP_FAILED)
        if "nonce" not in secret:
            read_secret()
        emit(kind="setup_error", error=message)
        os._exit(_EXIT_SETUP_FAILED)
    if role == "candidate":
        _candidate(sources, payload["program"], (ends["request_r"], ends["reply_w"]))
    if "nonce" not in secret:
        read_secret()
    emit(kind="ready")  # its absence means the sandbox never started
    if role == "evaluator":
        _evaluate(sources, secret["tests"], (ends["request_w"], ends["reply_r"]), pid, emit)
    else:
        _run_io(
            payload["program"], secret["tests"], emit, result_fd, payload["setup"], payload["output_cap"], child_limits
        )
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    emit(kind="done")
    os._exit(0)  # skip atexit handlers the program may have registered


wire = None  # sandbox_wire, loaded from the payload by main()
main()
