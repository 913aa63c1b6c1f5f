"""What the sandbox's empty root holds: exactly the host paths its interpreter needs.

The plan is computed once per interpreter, in the caller, by asking the interpreter itself
(its executable, its standard library, its ``lib-dynload`` extensions) and ``ldd`` (the
shared libraries those load, and the dynamic loader). Every other host file stays out of
the sandbox: no dataset, no test file, no home folder, no token. ``sandbox_confine.py``
carries the plan out inside the sandbox (read-only binds in a fresh tmpfs root).

Host paths are reproduced literally, symlinks included (``/lib -> usr/lib``), so the
paths baked into binaries (the loader ``/lib64/ld-linux-x86-64.so.2``) resolve.

Adding packages a task needs: set ``RLVR_SANDBOX_PATHS`` to host paths separated by
``:``; each is bound read-only at the same place, and each directory among them is put on
the program's ``sys.path`` (so ``RLVR_SANDBOX_PATHS=$VIRTUAL_ENV/lib/python3.11/site-packages``
makes numpy importable if it is installed there; the shared libraries its extensions load
must then be reachable too: add their folders, as ``ldd`` on the ``.so`` files shows).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_ASK = (
    "import sys,os,sysconfig;p=sysconfig.get_paths();"
    "d=os.path.join(p['platstdlib'],'lib-dynload');"
    "print(os.path.realpath(sys.executable));print(p['stdlib']);print(p['platstdlib']);"
    "print(d if os.path.isdir(d) else '')"
)
Entry = tuple  # ("dir", path) | ("symlink", path, target) | ("bind", path, is_dir)


def extra_paths() -> list[str]:
    """Return the host paths named by ``RLVR_SANDBOX_PATHS`` that exist."""
    raw = os.environ.get("RLVR_SANDBOX_PATHS", "")
    return [os.path.abspath(p) for p in raw.split(":") if p and os.path.exists(p)]


def root_plan(python: str) -> tuple[list[Entry], list[str]]:
    """Return (plan, directories for sys.path) for a sandbox running ``python``.

    Raises OSError when the interpreter cannot be asked.
    """
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", _ASK],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": _SAFE_PATH},
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        raise OSError(f"cannot ask {python} for its paths: {exc}") from None
    executable, stdlib, platstdlib, dynload = (out.splitlines() + ["", "", "", ""])[:4]
    wanted = {executable, python, stdlib, platstdlib}
    objects = [executable]
    if dynload:
        objects += [str(p) for p in Path(dynload).glob("*.so")]
    wanted |= _shared_library_dirs(objects)
    extra = extra_paths()
    wanted |= set(extra)
    plan: list[Entry] = []
    done: set[str] = set()
    for path in sorted(p for p in wanted if p):
        _add(plan, done, path)
    return _drop_nested(plan), [p for p in extra if os.path.isdir(p)]


def _shared_library_dirs(objects: list[str]) -> set[str]:
    """Return the folders of the libraries ``objects`` load, and the dynamic loader's path."""
    try:
        out = subprocess.run(
            ["ldd", *objects], capture_output=True, text=True, timeout=60, env={"PATH": _SAFE_PATH}
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return set()
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts.index("=>") + 1 < len(parts):
            lib = parts[parts.index("=>") + 1]
            if lib.startswith("/"):
                found.add(os.path.dirname(lib))
        elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
            found.add(parts[0])  # the loader, by the literal path the binaries name
    return found


def _add(plan: list[Entry], done: set[str], path: str) -> None:
    """Reproduce ``path`` in the plan: parent dirs, symlinks along the way, then a bind."""
    parts = [p for p in path.split("/") if p]
    current = ""
    for i, part in enumerate(parts):
        current += "/" + part
        if os.path.islink(current):  # followed even when already made
            target = os.readlink(current)
            if current not in done:
                plan.append(("symlink", current, target))
                done.add(current)
            resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
            _add(plan, done, "/".join([resolved, *parts[i + 1 :]]))
            return
        if current in done:
            continue
        if i == len(parts) - 1:
            plan.append(("bind", current, os.path.isdir(current)))
        else:
            plan.append(("dir", current))
        done.add(current)


def _drop_nested(plan: list[Entry]) -> list[Entry]:
    """Drop binds that an earlier bind of a parent folder already covers."""
    dirs = [e[1] for e in plan if e[0] == "bind" and e[2]]
    kept = []
    for entry in plan:
        inside = any(entry[1] != d and entry[1].startswith(d + "/") for d in dirs)
        if not inside:
            kept.append(entry)
    return kept
