"""The wheel holds every module and data file of the four source folders.

An editable install imports straight from the checkout, so a subfolder missing from the
package list would pass every other test and still be absent from ``pip install rlvr``.
This builds the real wheel (setuptools, no build isolation: nothing is downloaded) from a
copy of the sources and compares its file list with the folders.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("verifiers", "envs", "trainer", "datasets")
DATA = {"trainer/engines/default_model": "*", "datasets/data": "*.jsonl"}
"""Data folders shipped as package data, with the files they ship."""


def _sources(tmp: Path) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for root in ROOTS:
        shutil.copytree(REPO / root, src / root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def test_the_wheel_holds_every_module_and_data_file(tmp_path):
    src = _sources(tmp_path)  # a copy: the build writes build/ and *.egg-info next to the sources
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("rlvr-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    want = {f"rlvr/{p.relative_to(REPO).as_posix()}" for root in ROOTS for p in (REPO / root).rglob("*.py")}
    for folder, pattern in DATA.items():
        want |= {f"rlvr/{p.relative_to(REPO).as_posix()}" for p in (REPO / folder).glob(pattern)}
    assert len(want) > 60  # the folders were read
    assert sorted(want - shipped) == []
    assert "rlvr/trainer/step.py" in shipped and "rlvr/trainer/cluster/loop.py" in shipped
