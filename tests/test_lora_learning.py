"""LoRA learns: on `arithmetic`, from the default model, adapters alone raise the reward by >= 0.3.

The learning test's set-up (``tests/test_learning.py``: ``scripts/train.py`` in a subprocess,
the curve read from ``metrics.jsonl``) with ``--lora-rank 16 --lora-alpha 32``: 8.5% as many
trainable parameters as the model has, at a 5x larger learning rate. Tuned on this machine
(one torch thread): 2e-3 rose +0.337 (seed 0) and +0.368 (seed 1) in 100 steps (~85-130 s), but
+0.343 and +0.276 in 120 (the last-10 mean is noisy: 100 is the length both seeds pass at);
2.5e-3 rose +0.271 and 5e-3 collapsed (-0.29) in 100; 3e-3 rose +0.219 in 60 (those rises
against the last 10 steps). The rise is now ``bookkeeping.metrics.reward_rise``, against the
run's second half: seed 0 reads +0.366 there (+0.435 against the last 10) with shared prompts
in the learner, whose rounding differs from the runs above.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_learning import FLAGS, ROOT

from rlvr.trainer.bookkeeping.metrics import reward_rise

STEPS = 100
OVERRIDES = {"--max-steps": str(STEPS), "--learning-rate": "2e-3"}
LORA_FLAGS = [OVERRIDES.get(prev, flag) for prev, flag in zip(["", *FLAGS], FLAGS)]
LORA_FLAGS += ["--lora-rank", "16", "--lora-alpha", "32"]


@pytest.mark.slow
def test_lora_raises_arithmetic_reward(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *LORA_FLAGS, "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA: 28 adapted layers" in proc.stderr  # the adapters, not the whole model, trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in records]
    assert len(rewards) == STEPS
    first, last = reward_rise(rewards)
    print(f"\nLoRA: reward first 10 steps {first:.3f}, second half {last:.3f}, {STEPS} steps in {seconds:.0f} s")
    assert last - first >= 0.3, f"reward rose only {last - first:.3f} ({first:.3f} -> {last:.3f})"
