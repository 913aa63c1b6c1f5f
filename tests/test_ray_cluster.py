"""The README's multi-node launch, on one machine: `ray start --head`, `ray start --address`, then train.py.

Two Ray nodes (a head with 1 CPU, a worker with 2) started exactly as the README says,
each by its own ``ray start --block`` process; ``train.py --cluster ray --ray-address``
joins them, places 3 generator actors (they cannot all fit on one node) and trains. The
run must leave the cluster it joined running and free of its actors; stopping the two
``ray start`` processes then leaves nothing behind. Token authentication, which Ray turns
on by default, is off here (``RAY_AUTH_MODE=disabled``: one machine, no network).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.engines.build import installed

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not installed("ray"), reason="ray is not installed")]

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter


def process_tree(pid: int) -> list[int]:
    """Pids of the live processes under ``pid`` (from /proc), ``pid`` included."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and stat[stat.rindex(")") + 2] != "Z":
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    found, frontier = [pid], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_train_py_joins_a_two_node_cluster_and_leaves_it_as_it_found_it(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    address = f"127.0.0.1:{free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "cwd": tmp_path}
    head = subprocess.Popen([*RAY, "start", "--head", "--port", address.split(":")[1], "--num-cpus", "1",
                             "--include-dashboard", "false", "--block"], **quiet)  # fmt: skip
    nodes, started = [head], []
    try:
        time.sleep(3)  # the worker's `ray start` gives up if the head's GCS is not up yet
        nodes.append(subprocess.Popen([*RAY, "start", "--address", address, "--num-cpus", "2", "--block"], **quiet))
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train.py"), "--env", "arithmetic", "--cluster", "ray",
             "--ray-address", address, "--num-generators", "3", "--max-staleness", "1", "--max-steps", "3",
             "--group-size", "2", "--prompts-per-step", "3", "--max-new-tokens", "4", "--torch-threads", "1",
             "--output-dir", str(out), "--no-progress"],
            capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        placed = re.findall(r"generator (rlvr-generator-\d) \(pid \d+ on .*, node \S+ (\w+)\) ready", proc.stderr)
        assert len(placed) == 3 and len({node for _, node in placed}) == 2, proc.stderr[-3000:]  # both nodes
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
        # Joined, not started: the cluster is still up, and none of the run's actors is.
        check = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
             "print('actors:', ray.util.list_named_actors(all_namespaces=True))"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert "actors: []" in check.stdout, check.stderr[-3000:]
        started = [p for node in nodes for p in process_tree(node.pid)]
    finally:
        for node in nodes:
            node.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
    # `ray start` records the head for later `ray.init()` calls and SIGTERM does not remove it (`ray stop`
    # would, but stops every Ray on the machine): drop the record of this test's head.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(":" + address.split(":")[1]):
        current.unlink()
    deadline = time.monotonic() + 20
    while [p for p in started if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in started if alive(p)] == []
