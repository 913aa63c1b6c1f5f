"""GRPO on a local Ray learns: two generator actors, staleness 1, arithmetic reward up by >= 0.3.

The issue's command, ``train.py --env arithmetic --cluster ray --num-generators 2
--max-staleness 1``, with the settings of ``tests/test_learning.py`` (the synchronous
loop's learning test: 200 steps of 16 prompts x 8, learning rate 4e-4), run as a user
would, in a subprocess that starts and stops its own local Ray; the curve is read from
``metrics.jsonl``. From step 2 on every batch is exactly one learner step stale (sampled
by version ``s - 2``) and is learned with the decoupled objective; each generator plays
8 of the 16 groups of every step.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_learning import FLAGS as SYNC_FLAGS
from test_learning import STEPS

from rlvr.trainer.bookkeeping.metrics import read_metrics, reward_rise
from rlvr.trainer.engines.build import installed

ROOT = Path(__file__).resolve().parents[1]
# The synchronous learning test's run (test_learning.py), with two generator actors one step stale.
FLAGS = [*SYNC_FLAGS, "--cluster", "ray", "--num-generators", "2", "--max-staleness", "1"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not installed("ray"), reason="ray is not installed (pip install 'rlvr[ray]')")
def test_two_ray_generators_at_staleness_1_raise_arithmetic_reward(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["ray/num_generators"] == 2.0 and r["staleness_max"] <= 1 for r in records)
    assert statistics.fmean(r["staleness_mean"] for r in records) > 0.95  # really one step stale
    rewards = [r["reward_mean"] for r in records]
    first, last = reward_rise(rewards)
    print(f"\nreward first 10 steps {first:.3f}, second half {last:.3f}, {STEPS} steps in {seconds:.0f} s")
    assert last - first >= 0.3, f"reward rose only from {first:.3f} to {last:.3f}"
