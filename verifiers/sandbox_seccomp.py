"""The system-call filter loaded into every candidate process, built with libseccomp.

The filter is compiled once per caller process by the system's libseccomp through its
maintained Python binding (Debian/Ubuntu: ``apt-get install python3-seccomp``; ``bash
scripts/dev.sh setup`` installs it when run as root), exported as BPF and loaded by the
candidate right before its code runs (``sandbox_confine.py``). No hand-built BPF.

The binding is a compiled module of the system's Python, which a virtual environment does
not see: it is loaded by file from the system's ``dist-packages`` when its ABI tag matches
this interpreter, else the filter is built by the system's ``python3`` running this file.
When neither works, :func:`filter_bpf` returns None and says why; the sandbox then runs
without a filter and says so (a warning, and the level's description).

Refused with EPERM (never needed by a program under test): mounts and the new mount API,
new namespaces (``unshare``, ``setns``, ``clone`` with a namespace flag; ``clone3``, whose
flags a filter cannot read, answers ENOSYS so that libc falls back to ``clone``),
``pivot_root``, ``chroot``, the kernel keyring, ``bpf``, ``ptrace``, reading or writing
another process's memory, ``perf_event_open``, inotify and fanotify, ``userfaultfd``,
file handles, kernel modules, ``kexec``, swap, reboot, ``acct``, quotas, port I/O and
``syslog``.
"""

from __future__ import annotations

import errno
import glob
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
from functools import lru_cache

REFUSED = (
    "mount",
    "umount2",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "pivot_root",
    "chroot",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "perf_event_open",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "fanotify_init",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "iopl",
    "ioperm",
    "syslog",
    "lookup_dcookie",
)
NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # NS CGROUP UTS IPC USER PID NET TIME
_SYSTEM_DIRS = ("/usr/lib/python3/dist-packages",)


def build(seccomp) -> bytes:
    """Return the filter as BPF, built with the ``seccomp`` binding module given."""
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in REFUSED:
        try:
            f.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError):
            pass  # not a system call on this architecture (iopl on arm64, ...)
    for flag in NAMESPACE_FLAGS:
        f.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def _load_binding():
    try:
        import seccomp  # a system Python, or a venv made with --system-site-packages

        return seccomp
    except ImportError:
        pass
    for folder in _SYSTEM_DIRS:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for path in glob.glob(os.path.join(folder, "seccomp" + suffix)):
                loader = importlib.machinery.ExtensionFileLoader("seccomp", path)
                spec = importlib.util.spec_from_loader("seccomp", loader)
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
                return module
    return None


@lru_cache(maxsize=1)
def filter_bpf() -> tuple[bytes | None, str]:
    """Return (BPF program or None, how it was built or why there is none)."""
    try:
        binding = _load_binding()
        if binding is not None:
            return build(binding), "libseccomp " + str(getattr(binding, "__file__", ""))
    except (ImportError, OSError, RuntimeError) as exc:
        reason = f"loading the binding failed ({exc})"
    else:
        reason = "the python3-seccomp binding is not installed"
    system = "/usr/bin/python3"
    if os.path.exists(system) and os.path.realpath(system) != os.path.realpath(sys.executable):
        try:
            run = subprocess.run([system, "-I", __file__], capture_output=True, timeout=60)
            if run.returncode == 0 and run.stdout and len(run.stdout) % 8 == 0:
                return run.stdout, "libseccomp through " + system
        except (OSError, subprocess.SubprocessError):
            pass
    return None, reason + " (Debian/Ubuntu: apt-get install python3-seccomp)"


if __name__ == "__main__":  # run by the system's python3 when ours cannot load the binding
    import seccomp as _binding

    sys.stdout.buffer.write(build(_binding))
