"""scripts/evaluate.py: the default model on arithmetic, through the real rollout code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def test_default_model_solves_some_arithmetic_greedily(tmp_path):
    out = tmp_path / "episodes.jsonl"
    proc = run(["--env", "arithmetic", "--num-tasks", "16", "--samples", "2", "--temperature", "1",
                "--max-new-tokens", "8", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    episodes = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(episodes) == 32
    assert {e["task_id"] for e in episodes} == {f"arithmetic-{i}" for i in range(16)}
    mean = sum(e["reward"] for e in episodes) / len(episodes)
    assert f"mean reward {mean:.4f}" in proc.stdout
    greedy = run(["--env", "arithmetic", "--num-tasks", "32", "--max-new-tokens", "8"])
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    # The warm-up model answers most 1-digit sums greedily; random weights score ~0.
    assert float(greedy.stdout.split("mean reward ")[1].split(",")[0]) >= 0.5


def test_bad_arguments_are_usage_errors():
    proc = run(["--env", "arithmetic", "--samples", "0"])
    assert proc.returncode == 2 and "--samples must be >= 1" in proc.stderr
    proc = run(["--env", "no-such-env"])
    assert proc.returncode == 2 and "unknown environment 'no-such-env'" in proc.stderr
