"""The sandbox's isolation levels: how each is started, and what each does not isolate.

``namespaces`` is the level; the two below it run only when asked for (the
``isolation=`` argument, or ``RLVR_SANDBOX_ISOLATION``), and are then named, with what they
leave open, in a warning and in ``scripts/verify.py``'s summary (:func:`describe`). See
``sandbox.py``'s docstring for the threat model level by level.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

from rlvr.verifiers import sandbox_cgroup, sandbox_fs, sandbox_seccomp

logger = logging.getLogger(__name__)

ISOLATION_LEVELS = ("namespaces", "user-namespaces", "process-group")
SANDBOX_UID = int(os.environ.get("RLVR_SANDBOX_UID", "65533"))
"""Host uid (and gid) of the candidate at ``namespaces``: unprivileged, used by nothing
else, so what the candidate uses (processes, inotify, namespaces) is charged to it."""
EVALUATOR_UID = 65534  # nobody: the evaluator, apart from the candidate so it cannot be signalled
_FALLBACK_UID = 65534  # process-group as root: both roles
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_NS_FLAGS = ("--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc")

NOT_ISOLATED = {
    "namespaces": "same kernel (no boundary against kernel exploits)",
    "user-namespaces": "the candidate runs as the caller's uid on the host (its processes "
    "count against the caller's limits); no cgroup unless one is delegated "
    "(RLVR_SANDBOX_CGROUP): memory, processes and CPU are per process and "
    "the time limit is wall-clock time",
    "process-group": "NOTHING but a scratch dir: the program sees the network, every file "
    "the uid can read (tests, datasets, the caller's home when not root), "
    "the caller's processes; memory, processes and CPU per process only",
}


@dataclass(frozen=True)
class Backend:
    level: str
    python: str
    prefix: tuple[str, ...]  # wrapper command (unshare ...) before the interpreter
    uid: int | None  # the candidate's host uid (dropped to as root), or None
    evaluator_uid: int | None  # the evaluator's host uid (as root), or None
    plan: list = field(default_factory=list)  # sandbox_fs plan of the empty root
    sys_path: list = field(default_factory=list)  # RLVR_SANDBOX_PATHS folders
    seccomp: bytes | None = None  # BPF from sandbox_seccomp, or None

    @property
    def namespaced(self) -> bool:
        return self.level != "process-group"


def candidate_pythons() -> list[str]:
    """Return the interpreters to try, best first (real paths: the root holds no venv links)."""
    forced = os.environ.get("RLVR_SANDBOX_PYTHON")
    if forced:
        return [forced]
    names = [
        sys.executable,
        getattr(sys, "_base_executable", ""),
        shutil.which("python3", path=_SAFE_PATH) or "",
        "/usr/bin/python3",
    ]
    seen: dict[str, None] = {}
    for name in names:
        if name and os.path.exists(name):
            seen.setdefault(os.path.realpath(name), None)
    return list(seen)


def candidate_backends(level: str) -> list[Backend]:
    """Return the backends of ``level``, one per interpreter; ValueError for an unknown level."""
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"isolation level {level!r}; expected one of {ISOLATION_LEVELS}")
    root = os.geteuid() == 0
    unshare = shutil.which("unshare", path=_SAFE_PATH)
    if level == "process-group":
        uid = _FALLBACK_UID if root else None
        return [Backend(level, py, (), uid, uid) for py in candidate_pythons()]
    if not unshare or (level == "namespaces" and not root):
        return []
    prefix = (unshare, *_NS_FLAGS) if level == "namespaces" else (unshare, "--user", "--map-root-user", *_NS_FLAGS)
    bpf = sandbox_seccomp.filter_bpf()[0]
    backends = []
    for py in candidate_pythons():
        try:
            plan, sys_path = sandbox_fs.root_plan(py)
        except OSError:
            continue
        uids = (SANDBOX_UID, EVALUATOR_UID) if level == "namespaces" else (None, None)
        backends.append(Backend(level, py, prefix, *uids, plan, sys_path, bpf))
    return backends


def describe(level: str) -> str:
    """Return one line: the level and what it does not isolate (for logs and summaries)."""
    gaps = [NOT_ISOLATED[level]]
    if level != "process-group":
        bpf, why = sandbox_seccomp.filter_bpf()
        if bpf is None:
            gaps.append(f"no system-call filter: {why}")
        if level == "namespaces" and not sandbox_cgroup.available():
            gaps.append("no cgroup: " + sandbox_cgroup.NOT_CAPPED)
    return f"{level} (not isolated: {'; '.join(gaps)})"


def warn_weak_level(backend: Backend) -> None:
    """Log, once per process, a level below full isolation or a missing filter."""
    if backend.level != "namespaces" or backend.seccomp is None:
        logger.warning("code sandbox runs at %s", describe(backend.level))
