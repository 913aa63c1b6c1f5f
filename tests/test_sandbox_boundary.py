"""The sandbox as a boundary: what a hostile program cannot read, exhaust or forge (issue 21).

Each attack comes with a wrong answer (or beside right ones), scores as it should with a
reason naming what happened, and leaves nothing on the host: no process of the run, no
cgroup, no file. Runs at the level this process gets (``namespaces`` as root; set
``RLVR_SANDBOX_ISOLATION`` for a weaker one, as ``test_sandbox_nonroot.py`` does for a
user without privileges). Tests that need a cgroup skip where none can be made.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlvr.verifiers import sandbox_cgroup
from rlvr.verifiers.code import normalize_output, run_tests
from rlvr.verifiers.math import _prepare
from rlvr.verifiers.sandbox import SandboxLimits, isolation_level

REPO = Path(__file__).resolve().parents[1]
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
CGROUP = sandbox_cgroup.available()
needs_cgroup = pytest.mark.skipif(not CGROUP, reason="no cgroup can be made here")


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            if marker.encode() in Path(proc, "cmdline").read_bytes() + Path(proc, "comm").read_bytes():
                found.append(proc)
        except OSError:
            pass
    return found


def _cgroups_left() -> list[str]:
    return [
        p
        for p in glob.glob("/sys/fs/cgroup/*/**/rlvr-sandbox-*", recursive=True)
        if os.path.isdir(p) and f"-{os.getpid()}-" in p
    ]


@pytest.fixture
def marker():
    marker = "rlvr" + uuid.uuid4().hex[:10]
    yield marker
    time.sleep(0.05)
    assert _leftovers(marker) == []
    assert _cgroups_left() == []


def test_disk_hunt_for_tests_and_datasets_finds_nothing(tmp_path, marker):
    """A wrong program searches the disk for the file holding its tests: it is not there."""
    tests_file = tmp_path / f"{marker}.jsonl"
    tests_file.write_text(json.dumps({"tests": ADD_TESTS, "answer": 3}) + "\n")
    program = textwrap.dedent(f"""\
        import os
        found = []
        for top in ("/", {str(tmp_path)!r}, {str(REPO)!r}, "/root", "/home", "/work", "/tmp"):
            for root, dirs, files in os.walk(top):
                found += [os.path.join(root, f) for f in files
                          if f.endswith((".jsonl", ".parquet", ".arrow")) or {marker!r} in f]
        EXPECTED = {{(1, 2): 3, (2, 2): 4}} if found else {{}}
        def add(a, b):
            return EXPECTED.get((a, b), 0) if found else len(os.listdir("/"))
        print(sorted(os.listdir("/")), found[:3])
        """)
    result = run_tests(program, ADD_TESTS)
    assert result.reason == "tests failed: 2/2", result
    if isolation_level() != "process-group":
        io = run_tests(program + "print(found)\n", [{"input": "", "output": "[]"}])
        assert "[]" in io.failures[0] or io.reason == "tests failed: 1/1", io


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
def test_scratch_fill_is_capped(where, marker):
    """Filling the tmpfs scratch mounts stops at their size (64 MiB), not host memory."""
    program = textwrap.dedent(f"""\
        written, n = 0, 0
        try:
            while written < 512 << 20:  # files of 8 MiB: RLIMIT_FSIZE is 16 MiB
                with open({where!r} + "/fill%d" % n, "wb") as f:
                    for _ in range(8):
                        f.write(b"x" * (1 << 20)); written += 1 << 20
                n += 1
        except OSError as e:
            print("stopped", written >> 20, e.errno)
        """)
    result = run_tests(program, [{"input": "", "output": "never"}])
    got = result.failures[0].split("got ")[-1].strip("'").split()
    assert got[0] == "stopped" and int(got[1]) <= 64 and got[2] == "28", result  # ENOSPC


def test_own_tmpfs_or_namespace_is_refused(marker):
    """No mount namespace, no tmpfs of its own, no user namespace: no memory outside the caps."""
    program = textwrap.dedent("""\
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        for flags in (0x00020000, 0x10000000, 0x20000000, 0x40000000):  # NS USER PID NET
            out.append((libc.unshare(flags), ctypes.get_errno()))
        out.append((libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=3g"), ctypes.get_errno()))
        out.append((libc.inotify_init(), ctypes.get_errno()))
        print(out)
        """)
    result = run_tests(program, [{"input": "", "output": "refused"}])
    assert "[(-1, 1), (-1, 1), (-1, 1), (-1, 1), (-1, 1), (-1, 1)]" in result.failures[0], result


@needs_cgroup
def test_children_near_the_memory_cap_are_capped_per_sandbox(marker):
    """Four children of 100 MiB each under a run cap of 256 MiB (the default is 1 GiB):
    the run's cgroup kills some, "memory limit", and the host never held more."""
    program = textwrap.dedent("""\
        import os, time
        def add(a, b):
            pids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    block = bytearray(100 << 20)
                    for i in range(0, len(block), 4096):
                        block[i] = 1
                    time.sleep(2)
                    os._exit(0)
                pids.append(pid)
            for pid in pids:
                os.waitpid(pid, 0)
            return 0  # wrong: only the cap can be the reason
        """)
    start = time.monotonic()
    limits = SandboxLimits(sandbox_memory_bytes=256 << 20)
    result = run_tests(program, ADD_TESTS, timeout=20.0, limits=limits)
    assert result.reason == "memory limit", result
    assert time.monotonic() - start < 10


@needs_cgroup
def test_cpu_hog_of_many_sessions_does_not_starve_honest_neighbours(marker):
    """60 spinning processes in sessions of their own beside four honest programs: the
    honest ones keep their 1.0 (their own CPU time is what counts), the hog times out."""
    hog = textwrap.dedent("""\
        import os
        for _ in range(60):
            if os.fork() == 0:
                os.setsid()
                while True:
                    pass
        while True:
            pass
        """)
    honest = textwrap.dedent("""\
        def add(a, b):
            total = 0
            for i in range(3_000_000):
                total += i & 1
            return a + b
        """)
    with ThreadPoolExecutor(5) as pool:
        hog_run = pool.submit(run_tests, hog, ADD_TESTS, timeout=3.0)
        time.sleep(0.3)
        runs = list(pool.map(lambda _: run_tests(honest, ADD_TESTS, timeout=3.0), range(4)))
    assert [r.reason for r in runs] == ["passed"] * 4, runs
    assert hog_run.result().reason in ("timeout", "crashed"), hog_run.result()


def test_signals_at_the_evaluator_change_nothing(marker):
    """The candidate signals everything it can reach: the run still scores on the tests."""
    program = textwrap.dedent("""\
        import os, signal
        def add(a, b):
            for pid in [1, -1, os.getppid()]:  # 0 would be its own group
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL):
                    try:
                        os.kill(pid, sig) if pid != os.getpid() else None
                    except OSError:
                        pass
            return a + b
        """)
    assert run_tests(program, ADD_TESTS).reason == "passed"


def test_stop_iteration_in_map_is_a_failure(marker):
    program = "def f(x):\n    raise StopIteration\n"
    result = run_tests(program, ["assert all(map(f, [1, 2, 3]))", "assert list(map(f, [1])) == []"])
    assert result.reason == "tests failed: 2/2" and "PEP 479" in result.failures[0], result


def test_unicode_line_separators_are_not_newlines(marker):
    program = "print('1\\u20282\\u0085' + '3')\n"
    result = run_tests(program, [{"input": "", "output": "1\n2\n3"}])
    assert result.reason == "tests failed: 1/1", result
    assert normalize_output("a \r\nb\u3000") == "a\nb\u3000"


def test_a_right_program_returning_a_generator_or_function_passes(marker):
    program = textwrap.dedent("""\
        def evens(n):
            return (i for i in range(0, n, 2))
        def adder(k):
            return lambda x: x + k
        """)
    tests = [
        "assert list(evens(7)) == [0, 2, 4, 6]",
        "g = evens(3)\nassert next(g) == 0",
        "assert adder(2)(3) == 5",
        "assert sorted(evens(5), reverse=True) == [4, 2, 0]",
    ]
    assert run_tests(program, tests).reason == "passed"


def test_hedged_answer_with_a_huge_reference_is_bounded():
    """The hedge check reads the whole reference in the caller: it must be linear."""
    start = time.monotonic()
    prepared = _prepare("It is 5 or 7", "1" + " " * 200_000 + "x")
    assert time.monotonic() - start < 1.0 and prepared.item is not None


MALFORMED = [
    (
        "huge-number",
        b'{"id": 1, "verifier": "gsm8k", "completion": "5", "answer": ' + b"9" * 5000 + b"}",
        "invalid JSON",
    ),
    (
        "deep-nesting",
        b'{"id": 2, "verifier": "gsm8k", "completion": "5", "answer": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        "nested too deeply",
    ),
    ("not-utf8", b'{"id": 3, "verifier": "gsm8k", "completion": "\xff\xfe", "answer": "5"}', "not UTF-8"),
    (
        "mixed-tests",
        json.dumps(
            {
                "id": 4,
                "verifier": "code",
                "completion": "x = 1",
                "tests": ["assert x == 1", {"input": "", "output": ""}],
            }
        ).encode(),
        "mixes",
    ),
    (
        "io-not-strings",
        json.dumps(
            {"id": 5, "verifier": "code", "completion": "x = 1", "tests": [{"input": [], "output": 1}]}
        ).encode(),
        "must be strings",
    ),
]


def test_malformed_lines_through_verify_py_each_get_a_verdict(tmp_path):
    good = [
        b'{"id": "s1", "verifier": "gsm8k", "completion": "\\ud800 #### 5", "answer": "5"}',
        b'{"id": "\\udfff", "verifier": "code", "completion": "print(\'\\ud800\')", '
        b'"tests": [{"input": "\\ud800", "output": "x"}]}',
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join([line for _, line, _ in MALFORMED] + good) + b"\n")
    out = tmp_path / "out.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "verify.py"),
            "--input",
            str(src),
            "--output",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3, run.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(MALFORMED) + len(good)
    for (name, _, mention), rec in zip(MALFORMED, records):
        assert rec["score"] == 0.0 and f"line {rec['line']}" in rec["reason"], (name, rec)
        assert mention in rec["reason"], (name, rec)
    assert records[-2]["score"] == 1.0 and records[-1]["id"] == "\udfff"
    assert "code sandbox" in run.stdout
