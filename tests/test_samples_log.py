"""samples.jsonl: every --samples-every steps a few episodes a user can read, sync and async, resumed cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr.trainer.bookkeeping.metrics import SAMPLES_PER_LOG

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env", "arithmetic", "--group-size", "2", "--prompts-per-step", "3", "--max-new-tokens", "8",
         "--no-progress", "--torch-threads", "2"]  # fmt: skip


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pipeline", [[], ["--max-staleness", "1"]], ids=["sync", "async"])
def test_samples_are_written_every_n_steps_with_what_the_verifier_said(tmp_path, pipeline):
    proc = _train("--max-steps", "4", "--samples-every", "2", "--output-dir", str(tmp_path), *pipeline)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = _samples(tmp_path)
    groups = min(3, SAMPLES_PER_LOG)  # one episode of each group, up to SAMPLES_PER_LOG
    assert [s["step"] for s in samples] == [2] * groups + [4] * groups
    for s in samples:
        assert "What is" in s["prompt"], s["prompt"]
        assert len(s["completions"]) == 1 and set(s["reward_components"]) == {"correctness"}
        assert s["reason"] and s["task_id"].startswith("arithmetic-")
        assert s["reward"] == s["reward_components"]["correctness"]
        assert s["parsed"] is None or isinstance(s["parsed"], str)


def test_a_resumed_run_keeps_samples_up_to_its_checkpoint_and_zero_disables_them(tmp_path):
    proc = _train("--max-steps", "2", "--samples-every", "1", "--checkpoint-every", "1", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "checkpoints" / "step_000002" / "manifest.json").unlink()  # resume from step 1
    proc = _train("--max-steps", "3", "--samples-every", "1", "--resume", "auto", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s["step"] for s in _samples(tmp_path)] == [1] * 3 + [2] * 3 + [3] * 3
    off = tmp_path / "off"
    proc = _train("--max-steps", "1", "--samples-every", "0", "--output-dir", str(off))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (off / "samples.jsonl").exists()
