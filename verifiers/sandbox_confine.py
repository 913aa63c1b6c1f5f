"""Harness side of the namespace levels: an empty root, a cgroup, and a candidate with nothing.

Loaded by ``sandbox_harness.py`` from the payload (never imported by rlvr), so kept
import-light and compatible with Python 3.8+. The caller (``sandbox.py``) decides the
plan: which host paths to bind (``sandbox_fs.py``), which cgroups to join
(``sandbox_cgroup.py``), which system-call filter to load (``sandbox_seccomp.py``); this
module only carries it out, in the sandbox's PID 1 and in each candidate process.

Order matters and is the point of this module:

1. PID 1 joins the run's cgroups before it forks anything, so every process of the run is
   charged to them (memory, tmpfs and shared-memory pages included).
2. PID 1 builds the new root in a private tmpfs: read-only binds of exactly the planned
   paths, ``/dev/{null,zero,urandom}``, this PID namespace's ``/proc``, size-capped tmpfs
   on ``/tmp`` and ``/dev/shm``; then ``pivot_root`` into it and detaches the host's tree.
   ``pivot_root`` (not ``chroot``) so that no path leads back and a user namespace can
   still be created below it (the kernel refuses that to a chrooted process).
3. Each candidate process (forked by PID 1) becomes the sandbox uid on the host (as root:
   an unprivileged uid of its own, so whatever it uses is charged to that uid), enters a
   user namespace of its own where only that uid is mapped, drops every capability
   (bounding, ambient, effective, permitted, inheritable), sets ``no_new_privs`` and loads
   the system-call filter. Only then does its code run.
"""

import ctypes
import os

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MNT_DETACH = 2
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # same number on every architecture (Linux 5.12+)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_CLONE_NEWUSER = 0x10000000
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_PR_SET_DUMPABLE = 4
_PR_SET_KEEPCAPS = 8
_CAP_KILL = 5
_SECCOMP_MODE_FILTER = 2
_CAP_VERSION_3 = 0x20080522
_STAGE = "/tmp"  # where the new root is built (a private tmpfs over the host's /tmp)
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _check(rc, what):
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, what + ": " + os.strerror(errno))


def _mount(source, target, fstype, flags, data=None):
    rc = libc.mount(
        source and source.encode(),
        target.encode(),
        fstype and fstype.encode(),
        ctypes.c_ulong(flags),
        data and data.encode(),
    )
    _check(rc, "mount " + (fstype or source or "") + " on " + target)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _read_only(path, recursive):
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    rc = libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(_AT_FDCWD),
        path.encode(),
        ctypes.c_uint(_AT_RECURSIVE if recursive else 0),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, "mount_setattr(" + path + ", read-only)")


def join_cgroups(procs_files):
    """Move this process (and so all it will fork) into the run's cgroups."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")  # 0: the writing process (cgroup v1 and v2 alike)


def protect_init():
    """Make PID 1 the last choice of the OOM killer in its cgroup (root only)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass  # a user namespace may not lower it; the candidate is then as likely a victim


def _make(target, is_dir):
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))


def build_root(setup):
    """Build the empty root from ``setup["plan"]`` and pivot into it; the host tree is gone.

    Plan entries: ("dir", path), ("symlink", path, target), ("bind", host_path, is_dir).
    """
    stage = _STAGE
    _mount("tmpfs", stage, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    binds = []
    for entry in list(setup["plan"]) + [("bind", d, False) for d in _DEVICES]:
        kind, path = entry[0], entry[1]
        target = stage + path
        if kind == "dir":
            _make(target, True)
        elif kind == "symlink":
            if not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(entry[2], target)
        else:
            _make(target, entry[2])
            _mount(path, target, None, _MS_BIND | _MS_REC)
            binds.append(path)
    _make(stage + "/proc", True)
    _mount("/proc", stage + "/proc", None, _MS_BIND | _MS_REC)
    for path in binds:  # after all binds: a later bind may sit below an earlier one
        _read_only(stage + path, True)
    os.makedirs(stage + "/.old")
    machine = os.uname().machine
    rc = libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT.get(machine, 155)), stage.encode(), (stage + "/.old").encode())
    _check(rc, "pivot_root")
    os.chdir("/")
    _check(libc.umount2(b"/.old", _MNT_DETACH), "umount2(/.old)")
    os.rmdir("/.old")
    options = "size={},mode=1777".format(setup["scratch_bytes"])
    for path in ("/tmp", "/dev/shm"):
        _make(path, True)
    _read_only("/", False)
    for path in ("/tmp", "/dev/shm"):
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, options)


def become_evaluator(setup):
    """Drop PID 1's evaluator to its own unprivileged uid (as root), not the candidate's.

    It keeps one capability, CAP_KILL, to end the candidate (another uid); in its PID
    namespace it sees no other process.
    """
    ident = setup["evaluator_uid"]
    if ident is not None:
        for cap in range(64):
            if cap != _CAP_KILL:
                libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keepcaps")
        os.setgroups([])
        os.setresgid(ident, ident, ident)
        os.setresuid(ident, ident, ident)
        _set_capabilities(1 << _CAP_KILL)
        libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def become_candidate(setup):
    """In a freshly forked candidate: leave every privilege behind; raises on failure."""
    os.setsid()  # out of PID 1's process group and session
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")  # PID 1's -1000 is inherited; the candidate is the one to kill
    except OSError:
        pass
    uid, gid = setup["uid"], setup["gid"]
    if uid is not None:  # as root: an unprivileged host uid, which owns the user namespace
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        # A uid change makes a process non-dumpable, which gives its /proc files to root;
        # it must own them to write its own maps below.
        _check(libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    _check(libc.unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    outer_uid = uid if uid is not None else 0
    outer_gid = gid if gid is not None else 0
    for name, text in (
        ("uid_map", f"{outer_uid} {outer_uid} 1\n"),
        ("setgroups", "deny"),
        ("gid_map", f"{outer_gid} {outer_gid} 1\n"),
    ):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    _drop_capabilities()
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    bpf = setup.get("seccomp")
    if bpf:
        _load_filter(bpf)


def _drop_capabilities():
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(-1, "PR_CAPBSET_DROP")  # EINVAL: past the last capability of this kernel
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _set_capabilities(0)


def _set_capabilities(mask):
    """Effective and permitted = ``mask`` (capabilities 0-31), inheritable and the rest none."""
    header = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask, mask, 0, 0, 0, 0)  # {effective, permitted, inheritable} x2
    _check(libc.capset(header, data), "capset")


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_filter(bpf):
    program = ctypes.create_string_buffer(bpf, len(bpf))
    fprog = _Fprog(len(bpf) // 8, ctypes.cast(program, ctypes.c_void_p))
    rc = libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0)
    _check(rc, "seccomp filter")
