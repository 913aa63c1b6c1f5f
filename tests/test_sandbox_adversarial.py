"""Hostile programs against the sandbox, at every isolation level that works here.

Each attack comes with a wrong solution, so the only way to score is to fake success; every
one must score 0. After each run no process carrying the run's marker may survive (the
marker is in the command line of spawned interpreters and, via PR_SET_NAME, in
/proc/PID/comm of bare forks). Separate tests check the filesystem, the environment, the
network, the scratch dir and RLIMIT_NPROC. Levels that do not work on this machine are
skipped with the reason the probe gave.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlvr.verifiers.code import run_tests
from rlvr.verifiers.sandbox import (
    ISOLATION_LEVELS,
    SandboxLimits,
    run_in_sandbox,
)

NAMESPACED = ("namespaces", "user-namespaces")
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
ROOT_NPROC = "the kernel exempts host uid 0 from RLIMIT_NPROC; root uses 'namespaces'"
# Levels where RLIMIT_NPROC holds: user-namespaces run by root keeps host uid 0.
NPROC_LEVELS = ("namespaces", "process-group") if os.geteuid() == 0 else ISOLATION_LEVELS

PRELUDE = """\
import os, signal, subprocess, sys, time
MARKER = {marker!r}

def name_me():  # a bare fork keeps the harness's cmdline; put the marker in its comm
    import ctypes
    ctypes.CDLL(None).prctl(15, MARKER.encode(), 0, 0, 0)

def sleep_forever():
    name_me()
    while True:
        time.sleep(1000)

def add(a, b):  # wrong on purpose
    return 0
"""

# id, attack code (appended to PRELUDE), levels it runs at (None: all)
ATTACKS = [
    ("sys-exit-0", "sys.exit(0)", None),
    ("raise-systemexit", "raise SystemExit", None),
    ("os-exit-0", "os._exit(0)", None),
    ("os-exit-inside-test", "def add(a, b):\n    os._exit(0)", None),
    ("sys-exit-inside-test", "def add(a, b):\n    sys.exit(0)", None),
    ("print-passed-and-fake-json",
     "print('passed')\nprint('{\"score\": 1.0, \"reason\": \"passed\", \"passed\": 2}')", None),
    ("kill-parent", "os.kill(os.getppid(), signal.SIGKILL)", None),
    ("killpg-own-group", "os.killpg(0, signal.SIGKILL)", None),
    # kill(-1) outside a PID namespace would hit every process of the sandbox uid on the host
    ("kill-everything", "os.kill(-1, signal.SIGKILL)", NAMESPACED),
    ("flood-stdout", "while True:\n    sys.stdout.write('x' * 65536)", None),
    ("flood-stderr", "while True:\n    sys.stderr.write('x' * 65536)", None),
    ("fork-sleepers", "for _ in range(8):\n    if os.fork() == 0:\n        sleep_forever()", None),
    ("spawn-sleepers",
     "for _ in range(3):\n    subprocess.Popen([sys.executable, '-c',"
     " 'import time; time.sleep(1000)  # ' + MARKER])", None),
    # setsid escapes a process group: only a PID namespace catches it (documented)
    ("setsid-daemon-holding-stdout",
     "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        sleep_forever()\n"
     "    os._exit(0)", NAMESPACED),
    ("fork-bomb",
     "try:\n    while True:\n        if os.fork() == 0:\n            sleep_forever()\n"
     "except OSError:\n    pass", NPROC_LEVELS),
    ("allocate-30-gb", "x = bytearray(30 * 2**30)", None),
    ("busy-loop", "while True:\n    pass", None),
    ("fake-records-on-every-fd",
     "for fd in range(3, 64):\n    try:\n        os.write(fd, b\"{'kind': 'done', 'nonce': ''}\\n\")\n"
     "    except OSError:\n        pass", None),
    ("close-every-fd", "os.closerange(3, 1024)", None),
    ("atexit-prints-passed", "import atexit\natexit.register(print, 'passed')", None),
    ("shadow-assertionerror", "import builtins\nbuiltins.AssertionError = KeyError", None),
]


def _marked_processes(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose cmdline or comm contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            base = Path("/proc", entry)
            text = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            text += " " + (base / "comm").read_text()
            state = (base / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in text and state != "Z":
            found.append((int(entry), text.strip()[:80]))
    return found


def _kill_marked(marker: str) -> None:
    for pid, _ in _marked_processes(marker):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


@pytest.fixture
def marker():
    value = "rlvr" + uuid.uuid4().hex[:10]  # fits comm's 15 characters
    yield value
    _kill_marked(value)  # never leave a failed test's processes behind


@pytest.mark.parametrize("attack, levels", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_scores_zero_and_leaves_no_process(level, attack, levels, marker):
    if levels is not None and level not in levels:
        pytest.skip(f"not safe or not contained at {level} (see sandbox.py)")
    program = PRELUDE.format(marker=marker) + attack + "\n"
    start = time.monotonic()
    result = run_tests(program, ADD_TESTS, timeout=2.0, isolation=level)
    assert result.passed < result.total and result.reason != "passed", result
    assert time.monotonic() - start < 10.0
    if level not in NAMESPACED:  # SIGKILL to a process group is delivered asynchronously
        deadline = time.monotonic() + 2.0
        while _marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _marked_processes(marker) == []


def test_memory_and_flood_reasons(level):
    flood = run_tests("while True:\n    print('x' * 4096)\n", ADD_TESTS, isolation=level)
    huge = run_tests("x = bytearray(30 * 2**30)\n", ADD_TESTS, isolation=level)
    assert (flood.reason, huge.reason) == ("output limit", "memory limit")


@pytest.fixture
def open_tmp_path():
    """A temp dir every uid can traverse (pytest's tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="rlvr-fs-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_filesystem_outside_scratch_is_untouched(level, open_tmp_path, monkeypatch, marker):
    if level == "process-group" and os.geteuid() != 0:
        pytest.skip("process-group without root runs as the caller's uid: files are writable")
    # Namespaced levels must hold even for world-writable targets (read-only mounts);
    # process-group relies on the uid drop, so there the targets are root-owned 0755/0644.
    open_mode = 0o777 if level in NAMESPACED else 0o755
    guarded, cwd = open_tmp_path / "guarded", open_tmp_path / "cwd"
    for folder in (guarded, cwd):
        folder.mkdir()
        folder.chmod(open_mode)
    sentinel = guarded / "sentinel.txt"
    sentinel.write_text("original")
    sentinel.chmod(open_mode & 0o666)
    monkeypatch.chdir(cwd)
    targets = [str(guarded / "new.txt"), str(cwd / "new.txt")]
    if level in NAMESPACED:  # process-group does not hide the world-writable dirs
        targets += [f"/tmp/{marker}", f"/dev/shm/{marker}"]
    program = textwrap.dedent(f"""\
        import os
        for action in (lambda: open({str(sentinel)!r}, "w").write("hacked"),
                       lambda: os.remove({str(sentinel)!r}),
                       lambda: os.rename({str(sentinel)!r}, {str(guarded / 'moved')!r}),
                       *[lambda p=p: open(p, "w").write("x") for p in {targets!r}]):
            try:
                action()
            except OSError:
                pass
        open("in-scratch.txt", "w").write("fine")  # the scratch dir is writable
        assert open("in-scratch.txt").read() == "fine"
        """)
    result = run_tests(program, ["assert False"], isolation=level)
    assert result.failures == ["test 0: AssertionError at line 1: assert False"]
    assert sentinel.read_text() == "original"
    assert sorted(p.name for p in guarded.iterdir()) == ["sentinel.txt"]
    assert list(cwd.iterdir()) == []
    assert not any(os.path.exists(t) for t in targets[2:])


def test_scratch_dir_is_fresh_and_removed(level):
    program = "import os\nprint(os.getcwd(), os.environ['HOME'], sorted(os.listdir('.')))\n" \
              "open('left-behind.txt', 'w').write('x')\n"
    runs = [run_in_sandbox(program, [""], mode="io", isolation=level) for _ in range(2)]
    for run in runs:
        cwd, home, listing = run.of_kind("io")[0]["stdout"].decode().split(" ", 2)
        assert cwd == home
        assert listing.strip() == "[]"  # nothing from the previous run
        if level not in NAMESPACED:  # a host temp dir; with namespaces a tmpfs that vanished
            assert not os.path.exists(cwd)


def test_caller_environment_is_not_visible(level, monkeypatch):
    monkeypatch.setenv("RLVR_TEST_SECRET", "hunter2")
    program = "import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ').read())\n"
    run = run_in_sandbox(program, [""], mode="io", isolation=level)
    out = run.of_kind("io")[0]["stdout"].decode()
    assert out.splitlines()[0] == "['HOME', 'LANG', 'PATH']"
    assert "hunter2" not in out


def test_network_is_unreachable(level):
    if level not in NAMESPACED:
        pytest.skip("process-group does not isolate the network (documented)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = textwrap.dedent(f"""\
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
                print("connected")
            except OSError as exc:
                print("refused", type(exc).__name__)
            """)
        run = run_in_sandbox(program, [""], mode="io", isolation=level)
        assert run.of_kind("io")[0]["stdout"].decode().startswith("refused")
        with pytest.raises(TimeoutError):
            server.accept()


def test_process_limit_is_enforced(level, marker):
    if level == "user-namespaces" and os.geteuid() == 0:
        pytest.skip(ROOT_NPROC)
    program = PRELUDE.format(marker=marker) + textwrap.dedent("""\
        started = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    sleep_forever()
                started += 1
        except OSError:
            pass
        print(started)
        """)
    limits = SandboxLimits(timeout=10.0, max_processes=16)
    run = run_in_sandbox(program, [""], mode="io", limits=limits, isolation=level)
    assert int(run.of_kind("io")[0]["stdout"]) < 16


def test_process_limit_is_per_sandbox_with_namespaces(marker, namespaces_level):
    """Each sandbox has its own user namespace, so concurrent ones do not share the count."""
    program = PRELUDE.format(marker=marker) + textwrap.dedent("""\
        started = 0
        for _ in range(12):
            if os.fork() == 0:
                time.sleep(3)
                os._exit(0)
            started += 1
        print(started)
        """)
    limits = SandboxLimits(timeout=20.0, max_processes=16)
    with ThreadPoolExecutor(6) as pool:  # 6 x 13 processes of uid 65534 at once, cap 16
        runs = list(pool.map(lambda _: run_in_sandbox(
            program, [""], mode="io", limits=limits, isolation="namespaces"), range(6)))
    assert [r.of_kind("io")[0]["stdout"] for r in runs] == [b"12\n"] * 6
