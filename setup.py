"""Package discovery for rlvr: every folder under the four source roots, found, never listed.

The four source folders sit at the repo root and are mapped to ``rlvr.*``; they have no
``__init__.py`` at their roots so that ``datasets/`` or ``verifiers/`` never shadows the
Hugging Face ``datasets`` library (or the ``verifiers`` library) when Python runs from the
repo root. Setuptools' own ``find`` cannot rename a root folder, so the packages are walked
here: a new subfolder (``trainer/cluster/``, a data folder) is in the wheel without anyone
remembering to list it (``tests/test_packaging.py`` builds the wheel and checks). Everything
else about the project is in ``pyproject.toml``.
"""

from pathlib import Path

from setuptools import setup

ROOTS = {"rlvr.verifiers": "verifiers", "rlvr.envs": "envs", "rlvr.trainer": "trainer", "rlvr.datasets": "datasets"}
SKIP = {"__pycache__"}


def packages() -> list[str]:
    """Every folder under a root, as a dotted package name (namespace packages and data folders included)."""
    here = Path(__file__).resolve().parent
    found = []
    for name, folder in ROOTS.items():
        base = here / folder
        found.append(name)
        for sub in sorted(p for p in base.rglob("*") if p.is_dir() and not SKIP & set(p.relative_to(base).parts)):
            found.append(".".join([name, *sub.relative_to(base).parts]))
    return found


setup(package_dir=ROOTS, packages=packages())
