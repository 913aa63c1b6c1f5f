"""scripts/verify.py end to end: order, malformed lines, exit codes, summary, real data."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "scripts" / "verify.py"
DATA = ROOT.parent / "shared" / "data"


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VERIFY), *args], capture_output=True, text=True, timeout=300)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_mixed_verifiers_keep_input_order(tmp_path):
    rows = [
        {"id": "g1", "verifier": "gsm8k", "completion": "so 3 + 4 = 7\n#### 7", "answer": "7"},
        {"id": "f1", "verifier": "format", "completion": "<think>hm</think><answer>7</answer>"},
        {"id": "m1", "verifier": "math", "completion": "Thus $\\boxed{\\frac{1}{2}}$.", "answer": "0.5"},
        {"id": "g2", "verifier": "gsm8k", "completion": "#### 8", "answer": "7"},
        {"id": "c1", "verifier": "code", "completion": "```python\ndef f(x):\n    return x * 2\n```",
         "tests": ["assert f(2) == 4", "assert f(0) == 0"]},
        {"id": "c2", "verifier": "code", "completion": "print(input()[::-1])",
         "tests": [{"input": "abc\n", "output": "cba\n"}]},
    ]
    out = tmp_path / "out.jsonl"
    proc = run(["--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    got = read_jsonl(out)
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert [g["score"] for g in got] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert "verdicts / second" in proc.stdout and "mean score" in proc.stdout


@pytest.mark.parametrize(
    "line, fragment",
    [
        pytest.param("{not json", "invalid JSON", id="bad-json"),
        pytest.param('["a list"]', "expected a JSON object", id="not-an-object"),
        pytest.param('{"id": 1, "verifier": "gsm8k", "answer": "3"}', "missing field 'completion'", id="no-completion"),
        pytest.param('{"id": 1, "verifier": "gsm8k", "completion": "3"}', "missing field 'answer'", id="no-answer"),
        pytest.param('{"id": 1, "verifier": "code", "completion": "x", "tests": []}', "non-empty", id="empty-tests"),
        pytest.param('{"id": 1, "verifier": "nope", "completion": "x"}', "unknown verifier 'nope'", id="bad-verifier"),
        pytest.param('{"id": 1, "completion": "x", "answer": "1"}', "no verifier", id="no-verifier"),
    ],
)
def test_malformed_line_gets_a_verdict_with_its_line_number(tmp_path, line, fragment):
    good = {"id": "ok", "verifier": "gsm8k", "completion": "#### 5", "answer": "5"}
    src = write_jsonl(tmp_path / "in.jsonl", [good, line, good])
    out = tmp_path / "out.jsonl"
    proc = run(["--input", str(src), "--output", str(out), "--no-progress"])
    assert proc.returncode == 3, proc.stdout + proc.stderr
    got = read_jsonl(out)
    assert len(got) == 3
    assert got[0]["score"] == 1.0 and got[2]["score"] == 1.0
    assert got[1]["score"] == 0.0
    assert got[1]["reason"].startswith("malformed: line 2:")
    assert fragment in got[1]["reason"]


def test_default_verifier_flag_and_gzip_input(tmp_path):
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for i in range(50):
            f.write(json.dumps({"id": i, "completion": f"The answer is {i}.", "answer": str(i)}) + "\n")
    out = tmp_path / "v.jsonl"
    proc = run(["--input", str(src), "--output", str(out), "--verifier", "gsm8k", "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert [r["score"] for r in read_jsonl(out)] == [1.0] * 50


def test_missing_input_is_a_usage_error(tmp_path):
    proc = run(["--input", str(tmp_path / "absent.jsonl")])
    assert proc.returncode == 2
    assert "no such file" in proc.stderr


@pytest.mark.slow
def test_real_public_sets_through_verify_script():
    """GSM8K, HumanEval, MATH-500 and Math-Verify's cases (skips when ../shared/data is absent)."""
    if not DATA.is_dir():
        pytest.skip(f"real data not present at {DATA}")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_real_data.py"), "--data-dir", str(DATA)],
                          capture_output=True, text=True, timeout=1200)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env", ["gsm8k", "math", "code", "code-multiturn", "arithmetic"])
def test_env_gold_answers_all_score_one(tmp_path, env):
    out = tmp_path / "gold.jsonl"
    proc = run(["--env", env, "--output", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_jsonl(out)
    assert rows and all(r["score"] == 1.0 for r in rows)
    assert f"{len(rows)} scored 1, 0 did not" in proc.stdout


def test_env_gold_check_fails_on_a_wrong_reference(tmp_path):
    env_file = tmp_path / "bad_env.py"
    env_file.write_text(
        "from rlvr.envs.base import Task, TextEnv\n"
        "from rlvr.verifiers.types import Verdict\n\n"
        "class BadGold(TextEnv):\n"
        "    num_tasks = 3\n"
        "    def get_task(self, index):\n"
        "        return Task(task_id=f't{index}', prompt='say 1', reference='1', gold='2')\n"
        "    def verify(self, completion, task):\n"
        "        ok = completion.strip() == task.reference\n"
        "        return Verdict(float(ok), completion, 'correct' if ok else 'wrong answer')\n",
        encoding="utf-8",
    )
    proc = run(["--env", f"{env_file}:BadGold"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 did not" in proc.stdout
