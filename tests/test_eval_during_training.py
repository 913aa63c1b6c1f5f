"""train.py --eval-every: greedy pass@1 on held-out tasks, logged with the step's metrics, training unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlvr.trainer.bookkeeping.evaluation import HELD_OUT_OFFSET, training_eval
from rlvr.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env", "arithmetic", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
         "--no-progress", "--max-steps", "4", "--samples-every", "0"]  # fmt: skip


def _records(*args: str, out: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *SMALL, "--output-dir", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_logs_eval_metrics_and_leaves_training_as_it_was(tmp_path):
    with_eval = _records("--eval-every", "2", "--eval-limit", "8", out=tmp_path / "eval")
    without = _records(out=tmp_path / "plain")
    keys = {"eval/pass@1", "eval/reward_mean", "eval/components/correctness_mean", "eval/completion_length_mean"}
    assert [r["step"] for r in with_eval if keys <= set(r)] == [2, 4]
    assert not any(k.startswith("eval/") for k in with_eval[0])
    assert all(0.0 <= r["eval/pass@1"] <= 1.0 for r in with_eval if "eval/pass@1" in r)
    for a, b in zip(with_eval, without):  # greedy evaluation draws no random numbers
        assert (a["reward_mean"], a["loss"], a["grad_norm"]) == (b["reward_mean"], b["loss"], b["grad_norm"])


def test_held_out_tasks_are_disjoint_from_training_and_kwargs_pass_through():
    procedural = training_eval(TrainConfig(env="arithmetic", eval_every=5, eval_limit=3))
    assert procedural.indices == [HELD_OUT_OFFSET, HELD_OUT_OFFSET + 1, HELD_OUT_OFFSET + 2]
    dataset = training_eval(TrainConfig(env="gsm8k", eval_every=5, eval_limit=4, eval_env_kwargs={"split": "test"}))
    assert dataset.indices == [0, 1, 2, 3] and dataset.params.temperature == 0.0
    assert training_eval(TrainConfig()) is None


def test_eval_every_in_the_asynchronous_loop_logs_eval_metrics_and_leaves_training_as_it_was(tmp_path):
    with_eval = _records("--max-staleness", "1", "--eval-every", "1", "--eval-limit", "8", out=tmp_path / "eval")
    without = _records("--max-staleness", "1", out=tmp_path / "plain")
    sync = _records("--eval-every", "1", "--eval-limit", "8", out=tmp_path / "sync")
    assert [r["step"] for r in with_eval if "eval/pass@1" in r] == [1, 2, 3, 4]
    assert [r["staleness_mean"] for r in with_eval] == [0.0, 1.0, 1.0, 1.0]
    for a, b in zip(with_eval, without):  # greedy evaluation draws no random numbers
        assert (a["reward_mean"], a["loss"], a["grad_norm"]) == (b["reward_mean"], b["loss"], b["grad_norm"])
    # Step 1 learns the same batch (sampled by version 0) in both loops, so both evaluate the same weights.
    keys = ("eval/pass@1", "eval/reward_mean", "eval/completion_length_mean")
    assert [with_eval[0][k] for k in keys] == [sync[0][k] for k in keys]
