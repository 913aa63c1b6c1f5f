"""A cgroup of its own for each sandbox: caps on the whole run, and its own CPU clock.

Per-process rlimits do not bound a sandbox: a few children of 900 MiB each, or sixty
spinning processes in sessions of their own, each stay under them. A cgroup holds every
process of the run (PID 1 joins it before it forks, see ``sandbox_confine.py``), so:

- memory: ``memory.limit_in_bytes`` (v1, with ``memory.memsw.limit_in_bytes`` when swap
  accounting is on) or ``memory.max`` and ``memory.swap.max = 0`` (v2) cap the run's
  pages, tmpfs and shared memory included; past the cap the kernel's OOM killer ends a
  process *of the run* (PID 1 is exempted), never the trainer; the run reports it;
- processes: ``pids.max``;
- CPU: a CFS quota (``cpu.cfs_quota_us`` / ``cpu.max``) of ``limits.cpus`` CPUs, and the
  group's share of the machine is one group's whatever its process count;
- its own clock: ``cpuacct.usage`` (v1) or ``cpu.stat`` ``usage_usec`` (v2), which the
  caller holds against the time limit, so a busy neighbour cannot time out an honest run.

Where the cgroups go: under the caller's own cgroup in each hierarchy (``/proc/self/cgroup``),
or under ``RLVR_SANDBOX_CGROUP`` (a cgroup v2 folder delegated to this user). v1 is used
where its controllers are mounted (this includes hybrid set-ups), else v2 where the
unified hierarchy offers the controllers. Each cgroup is removed after its run. Where none
can be made (no root, no delegation) :func:`create` returns None and the first failure is
logged once, naming what is then not capped.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

logger = logging.getLogger(__name__)

_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_PERIOD_US = 100_000
_counter = itertools.count()
_warned = threading.Event()
NOT_CAPPED = (
    "memory, processes and CPU are capped per process only (rlimits), and the "
    "time limit is wall-clock time, which a busy neighbour can use up"
)


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    max_processes: int
    cpus: float


@lru_cache(maxsize=1)
def _layout() -> tuple[str, dict[str, str]]:
    """Return ("v1", {controller: parent dir}) or ("v2", {"unified": parent dir}) or ("", {})."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                own[name] = path
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fstype, _, options = right.split()[:3]
            point = left.split()[4]
            if fstype == "cgroup":
                for name in options.split(","):
                    mounts.setdefault(name, point)
            elif fstype == "cgroup2":
                mounts.setdefault("", point)
    if all(c in mounts and c in own for c in _V1_CONTROLLERS):
        return "v1", {c: mounts[c] + own[c] for c in _V1_CONTROLLERS}
    delegated = os.environ.get("RLVR_SANDBOX_CGROUP")
    if delegated:
        return "v2", {"unified": delegated}
    if "" in mounts and "" in own:
        return "v2", {"unified": mounts[""] + own[""]}
    return "", {}


class Cgroup:
    """The cgroups of one run: join with :attr:`procs_files`, read, then :meth:`remove`."""

    def __init__(self, version: str, dirs: dict[str, str]):
        self.version = version
        self.dirs = dirs  # controller (or "unified") -> this run's folder

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def cpu_seconds(self) -> float:
        """Return the CPU seconds used by every process of the run so far."""
        try:
            if self.version == "v1":
                with open(os.path.join(self.dirs["cpuacct"], "cpuacct.usage")) as f:
                    return int(f.read()) / 1e9
            with open(os.path.join(self.dirs["unified"], "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            pass
        return 0.0

    def oom_kills(self) -> int:
        """Return how many processes of the run the kernel killed for the memory cap."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        folder = self.dirs["memory" if self.version == "v1" else "unified"]
        try:
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        """Remove the run's folders; its processes are gone (the PID namespace is torn down)."""
        for folder in dict.fromkeys(self.dirs.values()):
            for attempt in range(50):
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: a process of the run is still exiting
                    time.sleep(0.002 * (attempt + 1))
            else:
                logger.warning("could not remove sandbox cgroup %s", folder)


def _write(folder: str, name: str, value: str, required: bool = True) -> None:
    path = os.path.join(folder, name)
    if not required and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(value)


def _make_v1(parents: dict[str, str], name: str, limits: CgroupLimits) -> Cgroup:
    dirs = {}
    try:
        for controller, parent in parents.items():
            folder = os.path.join(parent, name)
            if folder not in dirs.values():
                os.mkdir(folder)
            dirs[controller] = folder
        _write(dirs["memory"], "memory.limit_in_bytes", str(limits.memory_bytes))
        _write(dirs["memory"], "memory.memsw.limit_in_bytes", str(limits.memory_bytes), False)
        _write(dirs["pids"], "pids.max", str(limits.max_processes))
        _write(dirs["cpu"], "cpu.cfs_period_us", str(_PERIOD_US))
        _write(dirs["cpu"], "cpu.cfs_quota_us", str(max(1000, int(limits.cpus * _PERIOD_US))))
    except OSError:
        Cgroup("v1", dirs).remove()
        raise
    return Cgroup("v1", dirs)


def _make_v2(parent: str, name: str, limits: CgroupLimits) -> Cgroup:
    try:
        _write(parent, "cgroup.subtree_control", "+memory +pids +cpu")
    except OSError:
        pass  # already on, or not ours to turn on: the writes below tell
    folder = os.path.join(parent, name)
    os.mkdir(folder)
    group = Cgroup("v2", {"unified": folder})
    try:
        _write(folder, "memory.max", str(limits.memory_bytes))
        _write(folder, "memory.swap.max", "0", False)
        _write(folder, "pids.max", str(limits.max_processes))
        _write(folder, "cpu.max", f"{max(1000, int(limits.cpus * _PERIOD_US))} {_PERIOD_US}")
    except OSError:
        group.remove()
        raise
    return group


def create(limits: CgroupLimits) -> Cgroup | None:
    """Make the cgroups of one run, with its limits; None (warned once) where none can be made."""
    version, parents = _layout()
    name = f"rlvr-sandbox-{os.getpid()}-{next(_counter)}"
    try:
        if version == "v1":
            return _make_v1(parents, name, limits)
        if version == "v2":
            return _make_v2(parents["unified"], name, limits)
        raise OSError("no cgroup hierarchy with the memory, pids and cpu controllers is mounted")
    except OSError as exc:
        if not _warned.is_set():
            _warned.set()
            logger.warning("code sandbox: no cgroup can be made (%s); %s", exc, NOT_CAPPED)
        return None


def available() -> bool:
    """Tell whether this process can make sandbox cgroups (makes and removes one)."""
    group = create(CgroupLimits(64 << 20, 8, 1.0))
    if group is None:
        return False
    group.remove()
    return True
