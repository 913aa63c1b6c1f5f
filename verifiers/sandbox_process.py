"""Ending a sandbox run: leave no process of it alive, and remove its scratch space.

Split from ``sandbox.py`` (which starts and watches a run) because teardown has its own
invariant: whatever the program did (forked, changed its process group, made files
unwritable), after ``terminate`` no process of the run is alive and the main process is
reaped, and after ``remove_tree`` its fallback scratch directory is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path


def exited(pid: int) -> bool:
    """Tell whether child ``pid`` has exited, leaving it unreaped (its pid/pgid stay ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def terminate(proc: subprocess.Popen, namespaced: bool) -> None:
    """Leave no process of the run alive, then reap the main process."""
    if not namespaced:
        # The leader is not reaped yet (zombie at worst), so this pgid cannot be reused.
        signal_group(proc.pid)
    elif not exited(proc.pid):
        _kill_namespace(proc.pid)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # should not happen: init is SIGKILLed
        proc.kill()
        proc.wait()


def signal_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_namespace(unshare_pid: int) -> None:
    """SIGKILL the namespace's init (the child of ``unshare``).

    The kernel then kills everything else in the PID namespace, and ``unshare`` exits
    only after reaping init, which happens after the namespace is empty. Killing
    ``unshare`` itself would return too early (init's teardown still in flight).
    """
    for _ in range(400):  # unshare may not have forked yet: a few ms at most
        children = _children(unshare_pid)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if children or exited(unshare_pid):
            return
        time.sleep(0.005)
    os.kill(unshare_pid, signal.SIGKILL)  # never forked: nothing runs inside


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan /proc
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    found.append(int(entry))
        return found


def remove_tree(path: str) -> None:
    """Remove a fallback scratch dir, even if the program made parts of it unwritable."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            try:
                if stat.S_ISDIR(os.lstat(name).st_mode):  # never chmod through a symlink
                    os.chmod(name, 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)
