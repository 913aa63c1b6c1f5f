"""The boundary suite as a user without privileges, at the level that user gets (issue 21).

CI runs as root, so this test makes a system user (``rlvrsbx``, with ``useradd``) and runs
the attacks of ``test_sandbox_boundary.py`` that need no cgroup as that user, through
``runuser``, at ``RLVR_SANDBOX_ISOLATION=user-namespaces`` (asked for: it is below full
isolation). The venv's interpreter lives under /root, which that user cannot read, so the
script runs under the system's ``python3`` with only ``rlvr.verifiers`` on its path
(``code.py`` and the sandbox need nothing beyond the standard library). The filesystem
must still be confined: the user's files, the repository and the tests are not visible.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER = "rlvrsbx"
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runuser") or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to make the user), runuser and the system python3",
)

SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from rlvr.verifiers.code import run_tests
    from rlvr.verifiers.sandbox import describe, isolation_level
    secret = sys.argv[1]
    ADD = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    hunt = (
        "import os\\nfound = []\\n"
        "for top in ('/', '/work', '/root', '/home', '/tmp', %r):\\n"
        "    for r, d, fs in os.walk(top):\\n"
        "        found += [f for f in fs if f.endswith('.jsonl') or 'rlvr-secret' in f]\\n"
        "print(sorted(found))\\n" % os.path.dirname(secret))
    refused = (
        "import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n"
        "print([libc.unshare(0x20000), libc.unshare(0x10000000),"
        " libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=3g'), libc.inotify_init()])\\n")
    scratch = (
        "try:\\n    for i in range(16):\\n        open('/tmp/f%d' % i, 'wb').write(b'x' * (8 << 20))\\n"
        "except OSError as e:\\n    print(e.errno)\\n")
    signals = (
        "import os, signal\\ndef add(a, b):\\n"
        "    for pid in (1, -1, os.getppid()):\\n"
        "        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\\n"
        "            try:\\n                os.kill(pid, sig)\\n"
        "            except OSError:\\n                pass\\n"
        "    return a + b\\n")
    cases = {
        "hunt": run_tests(hunt, [{"input": "", "output": "[]"}]),
        "refused": run_tests(refused, [{"input": "", "output": "[-1, -1, -1, -1]"}]),
        "scratch": run_tests(scratch, [{"input": "", "output": "28"}]),  # ENOSPC at 64 MiB
        "signals": run_tests(signals, ADD),
        "stop": run_tests("def f(x):\\n    raise StopIteration\\n", ["assert all(map(f, [1, 2]))"]),
        "generator": run_tests("def g(n):\\n    yield from range(n)\\n", ["assert list(g(3)) == [0, 1, 2]"]),
        "separator": run_tests("print('1\\\\u20282')", [{"input": "", "output": "1\\n2"}]),
    }
    print(json.dumps({"level": isolation_level(), "describe": describe(isolation_level()),
                      "uid": os.getuid(),
                      **{k: [v.reason, v.failures[:1]] for k, v in cases.items()}}))
    """)


@pytest.fixture(scope="module")
def user() -> str:
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            pytest.skip(f"cannot make a user: {made.stderr.strip()}")
    return USER


def test_boundary_suite_as_an_unprivileged_user(user):
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        (Path(top) / "rlvr").mkdir()
        (Path(top) / "rlvr" / "verifiers").symlink_to(REPO / "verifiers")
        secret = Path(top) / "rlvr-secret-tests.jsonl"  # readable by the user, not by its sandbox
        secret.write_text('{"tests": ["assert add(1, 2) == 3"]}\n')
        os.chmod(secret, 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": top, "RLVR_SANDBOX_ISOLATION": "user-namespaces"}
        run = subprocess.run(
            [
                "runuser",
                "-u",
                user,
                "--",
                "env",
                *(f"{k}={v}" for k, v in env.items()),
                SYSTEM_PYTHON,
                "-c",
                SCRIPT,
                str(secret),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["uid"] != 0 and out["level"] == "user-namespaces"
    assert "runs as the caller's uid" in out["describe"] and "no cgroup" in run.stderr
    assert out["hunt"][0] == "passed", out["hunt"]  # nothing found: the disk is not there
    assert out["refused"][0] == "passed", out["refused"]
    assert out["scratch"][0] == "passed", out["scratch"]  # the 64 MiB tmpfs is full
    assert out["signals"][0] == "passed", out["signals"]
    assert out["stop"][0] == "tests failed: 1/1" and "PEP 479" in out["stop"][1][0], out["stop"]
    assert out["generator"][0] == "passed", out["generator"]
    assert out["separator"][0] == "tests failed: 1/1", out["separator"]
    leftovers = [p for p in glob.glob("/proc/[0-9]*/status") if _owned_by(p, user)]
    assert leftovers == []


def _owned_by(status: str, user: str) -> bool:
    import pwd

    try:
        uid = pwd.getpwnam(user).pw_uid
        return any(
            line.startswith("Uid:") and str(uid) in line.split() for line in Path(status).read_text().splitlines()
        )
    except (OSError, KeyError):
        return False
