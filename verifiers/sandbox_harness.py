"""The script that runs inside the sandbox: set up isolation, run the program, report.

``rlvr.verifiers.sandbox`` starts ``python -I -S -c <bootstrap> SOURCE_FD PAYLOAD_FD
RESULT_FD``; the bootstrap execs this file's text from SOURCE_FD (it is never imported).
PAYLOAD_FD holds a ``marshal``-ed dict written by the caller (the trusted direction);
RESULT_FD is the write end of a private pipe on which this script writes one ``repr``-ed
dict per line, each carrying the per-run random nonce from the payload. The caller accepts
only lines with the nonce, so a program that prints "passed", writes fake records without
the nonce, exits early or kills itself never produces a pass.

Modes:

- ``asserts``: compile the program (a syntax error is reported as such), exec it, then exec
  each test string in the same namespace; one record per test. User code runs in this
  process, so a deliberate in-process attack (walking frames to find the nonce) can forge
  records; see the isolation notes in ``sandbox.py``.
- ``io``: for each stdin string, fork a child that closes RESULT_FD and runs the program as
  ``__main__`` with that stdin; this process captures the child's stdout (capped) and
  sends it back raw. The comparison with the expected output happens in the caller; the
  expected outputs never enter the sandbox.

Kept import-light (no json, re, traceback, tempfile: each costs milliseconds, and start-up
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
_MS_NOSUID = 2
_MS_NODEV = 4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (added in Linux 5.12)
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER = 0x10000000


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
        view = view[_write(fd, view):]


def _short(text):
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(exc, filename, source):
    """One line: exception type, message, and the failing line of ``source`` if known."""
    try:
        name = type(exc).__name__
        if isinstance(exc, SyntaxError):
            return _short(f"{name} at line {exc.lineno}: {exc.msg}")
        lineno = None
        tb = exc.__traceback__
        while tb is not None:  # the innermost frame that belongs to this source wins
            if tb.tb_frame.f_code.co_filename == filename:
                lineno = tb.tb_lineno
            tb = tb.tb_next
        text = str(exc)
        out = name + (": " + text if text else "")
        lines = source.splitlines()
        if lineno is not None and 0 < lineno <= len(lines):
            out += f" at line {lineno}: {lines[lineno - 1].strip()}"
        return _short(out)
    except BaseException:  # a hostile __str__ must not take the harness down
        return "exception (unprintable)"


def _libc():
    import ctypes  # only here: ~2 ms, needed only when mounting or dropping privileges

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _check(ctypes, rc, what):
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _isolate_filesystem(ctypes, libc, setup):
    """Read-only everything (recursively), then fresh size-capped tmpfs scratch mounts."""

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    rc = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/",
                      ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ctypes, rc, "mount_setattr(/, RDONLY)")
    options = f"size={setup['scratch_bytes']},mode=1777".encode()
    for target in setup["tmpfs"]:
        if os.path.isdir(target):
            rc = libc.mount(b"tmpfs", target.encode(), b"tmpfs",
                            ctypes.c_ulong(_MS_NOSUID | _MS_NODEV), options)
            _check(ctypes, rc, "mount tmpfs on " + target)


def _set_limits(limits):
    for name, value in limits.items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY:  # an unprivileged caller may not raise it
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def _setup(setup, limits):
    """Namespaces (if any), scratch dir, rlimits, then drop privileges; raises on failure."""
    ctypes = libc = None
    if setup["pid_ns"] or setup["uid"] is not None:
        ctypes, libc = _libc()
    if setup["pid_ns"] and setup["uid"] is not None:
        _split_user_namespace(ctypes, libc, setup)  # returns in the child only
    elif setup["pid_ns"]:
        _isolate_filesystem(ctypes, libc, setup)
    elif setup["keeper"]:
        _keep()
    os.chdir(setup["workdir"])
    _set_limits(limits)
    if setup["uid"] is not None:
        os.setgroups([])
        os.setgid(setup["gid"])
        os.setuid(setup["uid"])
    if libc is not None:
        _check(ctypes, libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # Changing uid clears the parent-death signal; re-arm it (outside a PID namespace
        # it is what ends the run if our parent dies; inside, init's exit does that).
        _check(ctypes, libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")


def _exit_like(pid):
    """Wait for child ``pid`` and exit with its status (128 + signal if it was killed)."""
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _keep():
    """Fallback mode: stay behind as the program's parent, so `kill(getppid())` hits us."""
    pid = os.fork()
    if pid != 0:
        _exit_like(pid)


def _split_user_namespace(ctypes, libc, setup):
    """Fork; the child enters a fresh user namespace, the parent stays PID 1 as root.

    Only the sandbox uid/gid are mapped in it (to the same ids outside), so after the
    child drops to them its processes are charged to this namespace: RLIMIT_NPROC then
    counts this sandbox's processes only, not those of every sandbox using uid 65534.
    The parent writes the maps (while /proc is still writable), makes the filesystem
    read-only, lets the child go on, and exits with the child's status. It owns the
    mount namespace, so the child, without capabilities there, cannot undo the mounts.
    """
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        rc = libc.unshare(_CLONE_NEWUSER)
        errno = ctypes.get_errno()
        os.write(to_parent_w, b"1" if rc == 0 else b"0")
        os.close(to_parent_w)
        if rc != 0:
            raise OSError(errno, "unshare(CLONE_NEWUSER): " + os.strerror(errno))
        if os.read(to_child_r, 1) != b"1":
            raise OSError("the namespace init failed to set up the sandbox")
        os.close(to_child_r)
        return
    os.close(to_parent_w)
    os.close(to_child_r)
    go = b"0"
    try:
        if os.read(to_parent_r, 1) == b"1":  # else the child reports its own error
            for name, ident in (("uid_map", setup["uid"]), ("gid_map", setup["gid"])):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(f"{ident} {ident} 1\n")
            _isolate_filesystem(ctypes, libc, setup)
            go = b"1"
    finally:
        os.write(to_child_w, go)
        os.close(to_child_w)
    _exit_like(pid)


def _run_asserts(program, tests, emit):
    try:
        code = compile(program, "<program>", "exec")
    except BaseException as exc:  # SyntaxError, ValueError (NUL bytes), RecursionError, ...
        emit(kind="syntax", error=_describe(exc, "<program>", program))
        return
    # Not "__main__": demo blocks behind `if __name__ == "__main__":` (input(), prints) do
    # not run, as in the reference HumanEval harness.
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(code, namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included on purpose
        emit(kind="program", ok=False, error=_describe(exc, "<program>", program),
             memory=isinstance(exc, MemoryError))
        return
    emit(kind="program", ok=True)
    for index, test in enumerate(tests):
        filename = f"<test {index}>"
        try:
            exec(compile(test, filename, "exec"), namespace)
        except BaseException as exc:
            emit(kind="test", index=index, ok=False, error=_describe(exc, filename, test),
                 memory=isinstance(exc, MemoryError))
        else:
            emit(kind="test", index=index, ok=True)


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
            sys.stderr.write(_describe(exc, "<program>", program) + "\n")
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


def _run_io(program, inputs, emit, result_fd, setup, cap, child_limits):
    try:
        code = compile(program, "<program>", "exec")
    except BaseException as exc:
        emit(kind="syntax", error=_describe(exc, "<program>", program))
        return
    for index, text in enumerate(inputs):
        in_fd = _stdin_fd(text.encode("utf-8"), setup["workdir"])
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_fd)
            os.close(read_fd)
            os.dup2(in_fd, 0)
            os.dup2(write_fd, 1)
            _child_main(code, program, child_limits)
        os.close(write_fd)
        os.close(in_fd)
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
    payload_fd, result_fd = int(sys.argv[2]), int(sys.argv[3])
    payload = marshal.loads(_read_all(payload_fd))
    os.close(payload_fd)
    nonce = payload["nonce"]
    mode = payload["mode"]

    def emit(**record):
        record["nonce"] = nonce
        _write_all(result_fd, (_repr(record) + "\n").encode("utf-8", "backslashreplace"))

    try:
        limits = dict(payload["limits"])
        # In io mode the file-size cap waits for the child, so that the harness can put
        # a stdin bigger than the cap into its memfd.
        child_limits = {"RLIMIT_FSIZE": limits.pop("RLIMIT_FSIZE")} if mode == "io" else {}
        _setup(payload["setup"], limits)
    except BaseException as exc:
        emit(kind="setup_error", error=_short(f"{type(exc).__name__}: {exc}"))
        os._exit(_EXIT_SETUP_FAILED)
    emit(kind="ready")  # before any user code: its absence means the sandbox never started
    if mode == "asserts":
        _run_asserts(payload["program"], payload["tests"], emit)
    elif mode == "io":
        _run_io(payload["program"], payload["tests"], emit, result_fd, payload["setup"],
                payload["output_cap"], child_limits)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    emit(kind="done")
    os._exit(0)  # skip atexit handlers the program may have registered


main()
