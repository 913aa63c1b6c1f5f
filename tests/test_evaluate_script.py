"""scripts/evaluate.py on the default model, through the real rollout code: the table, JSONL, JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args, "--no-progress"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def table(stdout: str) -> dict[str, str]:
    """The metric -> value rows of the printed table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    return dict(line.split(None, 1) for line in lines[start + 2 :] if line.strip())


def test_arithmetic_with_eight_samples_reports_pass_at_k_and_maj(tmp_path):
    out, summary_json = tmp_path / "tasks.jsonl", tmp_path / "summary.json"
    proc = run(["--env", "arithmetic", "--num-samples", "8", "--limit", "8", "--max-new-tokens", "8",
                "--output", str(out), "--summary-json", str(summary_json)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = table(proc.stdout)
    for key in ("pass@1", "pass@2", "pass@4", "pass@8", "maj@8", "reward_mean", "components/correctness_mean",
                "completion_length_mean"):  # fmt: skip
        assert key in rows, proc.stdout
    summary = json.loads(summary_json.read_text())
    assert summary["tasks"] == 8 and summary["num_samples"] == 8 and summary["temperature"] == 1.0
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["task_id"] for t in tasks] == [f"arithmetic-{i}" for i in range(8)]
    assert all(len(t["samples"]) == 8 for t in tasks)
    # The summary is the mean of the per-task lines, and pass@k grows with k.
    pass1 = sum(t["num_correct"] for t in tasks) / 64
    assert summary["pass@1"] == pytest.approx(pass1) and rows["pass@1"] == f"{pass1:.4f}"
    assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"] <= summary["pass@8"]
    assert summary["maj@8"] == pytest.approx(sum(t["maj_correct"] for t in tasks) / 8)
    assert summary["reward_mean"] == pytest.approx(sum(s["reward"] for t in tasks for s in t["samples"]) / 64)


def test_gsm8k_greedy_prints_the_table():
    proc = run(["--env", "gsm8k", "--limit", "4", "--max-new-tokens", "16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = table(proc.stdout)
    assert rows["tasks"] == "4" and rows["num_samples"] == "1" and "pass@1" in rows
    assert "temperature 0" in proc.stdout  # one sample is greedy by default


def test_old_flag_names_and_a_users_env_class(tmp_path):
    (tmp_path / "my_envs.py").write_text(
        "from rlvr.envs.base import Task, TextEnv\n"
        "from rlvr.verifiers.types import Verdict\n\n\n"
        "class EchoEnv(TextEnv):\n"
        "    num_tasks = 3\n\n"
        "    def get_task(self, index):\n"
        "        return Task(task_id=f'echo-{index}', prompt='Say 1.', reference='1')\n\n"
        "    def verify(self, completion, task):\n"
        "        return Verdict(float(completion.strip() == '1'), parsed=completion.strip() or None)\n"
    )
    # --num-tasks / --samples are the old spellings; the env has 3 tasks, so 10 plays 3.
    proc = run(["--env", f"{tmp_path / 'my_envs.py'}:EchoEnv", "--num-tasks", "10", "--samples", "2",
                "--max-new-tokens", "4"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = table(proc.stdout)
    assert rows["tasks"] == "3" and rows["num_samples"] == "2" and "pass@2" in rows


def test_the_default_model_solves_most_one_digit_sums_greedily():
    proc = run(["--env", "arithmetic", "--limit", "32", "--max-new-tokens", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The warm-up model answers most 1-digit sums greedily; random weights score ~0.
    assert float(table(proc.stdout)["pass@1"]) >= 0.5


def test_bad_arguments_are_usage_errors():
    proc = run(["--env", "arithmetic", "--samples", "0"])
    assert proc.returncode == 2 and "--num-samples must be >= 1" in proc.stderr
    proc = run(["--env", "no-such-env"])
    assert proc.returncode == 2 and "unknown environment 'no-such-env'" in proc.stderr
