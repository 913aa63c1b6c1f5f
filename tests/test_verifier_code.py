"""The code verifier: program extraction, gold passes, wrong fails, each reason, real HumanEval.

Everything runs in the real sandbox (no mocks); see test_sandbox_adversarial.py for
hostile programs and the isolation properties.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from rlvr.verifiers.code import (
    CodeResult,
    extract_program,
    normalize_output,
    run_tests,
    verify_code,
    verify_code_batch,
)
from rlvr.verifiers.sandbox import ISOLATION_LEVELS, isolation_level

HUMANEVAL = Path("/work/shared/data/humaneval/HumanEval.jsonl.gz")

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]
SUM_IO = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}]


def fence(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\nDone."


# --- extraction -----------------------------------------------------------------------------

EXTRACT_CASES = [
    ("python-fence", fence("x = 1"), "x = 1\n"),
    ("untagged-fence", fence("x = 2", tag=""), "x = 2\n"),
    ("py-tag", fence("x = 3", tag="py"), "x = 3\n"),
    ("last-block-wins", fence("x = 1") + fence("x = 2"), "x = 2\n"),
    ("skips-other-language", fence("x = 1") + fence("int main() {}", tag="cpp"), "x = 1\n"),
    ("unclosed-final-fence", "text\n```python\ndef f():\n    return 1", "def f():\n    return 1\n"),
    ("no-fence-whole-text", "def f():\n    return 1\n", "def f():\n    return 1\n"),
    ("only-other-language", fence("int main() {}", tag="cpp"), None),
    ("empty-fence", "```python\n\n```", None),
    ("empty-completion", "   \n", None),
]


@pytest.mark.parametrize("completion, expected", [c[1:] for c in EXTRACT_CASES],
                         ids=[c[0] for c in EXTRACT_CASES])
def test_extract_program(completion, expected):
    assert extract_program(completion) == expected


NORMALIZE_CASES = [
    ("trailing-spaces", "1 2  \n3\t\n", "1 2\n3"),
    ("trailing-blank-lines", "a\n\n\n", "a"),
    ("crlf", "a\r\nb\r\n", "a\nb"),
    ("leading-space-kept", "  a\n", "  a"),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in NORMALIZE_CASES],
                         ids=[c[0] for c in NORMALIZE_CASES])
def test_normalize_output(text, expected):
    assert normalize_output(text) == expected


# --- verdicts -------------------------------------------------------------------------------

ADD_GOLD = "def add(a, b):\n    return a + b"
SUM_GOLD = "a, b = map(int, input().split())\nprint(a + b)"

VERDICT_CASES = [
    # id, completion, tests, score, reason
    ("asserts-gold", fence(ADD_GOLD), ADD_TESTS, 1.0, "passed"),
    ("asserts-gold-unfenced", ADD_GOLD, ADD_TESTS, 1.0, "passed"),
    ("asserts-all-wrong", fence("def add(a, b):\n    return a - b + 1"), ADD_TESTS, 0.0,
     "tests failed: 3/3"),
    ("asserts-partly-wrong", fence("def add(a, b):\n    return a + b if a > 0 else 7"),
     ADD_TESTS, 0.0, "tests failed: 2/3"),
    ("asserts-single-string", fence(ADD_GOLD), "assert add(2, 2) == 4", 1.0, "passed"),
    ("main-guard-not-run", fence(ADD_GOLD + "\nif __name__ == '__main__':\n    input()"),
     ADD_TESTS, 1.0, "passed"),
    ("prints-are-harmless", fence(ADD_GOLD + "\nprint('debug', add(1, 1))"), ADD_TESTS, 1.0,
     "passed"),
    ("io-gold", fence(SUM_GOLD), SUM_IO, 1.0, "passed"),
    ("io-trailing-whitespace", fence("print(sum(map(int, input().split())), '  ')\nprint()"),
     SUM_IO, 1.0, "passed"),
    ("io-sys-exit-0-after-output", fence(SUM_GOLD + "\nimport sys\nsys.exit(0)"), SUM_IO, 1.0,
     "passed"),
    ("io-wrong", fence("a, b = map(int, input().split())\nprint(a - b)"), SUM_IO, 0.0,
     "tests failed: 2/2"),
    ("io-right-output-but-exit-1", fence(SUM_GOLD + "\nraise SystemExit(1)"), SUM_IO, 0.0,
     "tests failed: 2/2"),
    ("no-code", "I don't know.\n```text\nnothing\n```", ADD_TESTS, 0.0, "no code found"),
    ("syntax-error", fence("def add(a, b) return a + b"), ADD_TESTS, 0.0, "syntax error"),
    ("io-syntax-error", fence("print(("), SUM_IO, 0.0, "syntax error"),
    ("runtime-error", fence("def add(a, b):\n    return a + b\nundefined_name"), ADD_TESTS, 0.0,
     "runtime error"),
    ("top-level-sys-exit", fence(ADD_GOLD + "\nimport sys\nsys.exit(0)"), ADD_TESTS, 0.0,
     "runtime error"),
    ("memory-limit", fence("def add(a, b):\n    return len(bytearray(8 * 2**30))"), ADD_TESTS,
     0.0, "memory limit"),
    ("io-memory-limit", fence("x = bytearray(8 * 2**30)"), SUM_IO, 0.0, "memory limit"),
    ("file-size-limit", fence("open('big', 'w').write('x' * (20 << 20))\nprint(3)"), SUM_IO[:1],
     0.0, "tests failed: 1/1"),
    ("io-stdin-bigger-than-file-limit", fence("import sys\nprint(len(sys.stdin.read()))"),
     [{"input": "x" * (20 << 20), "output": str(20 << 20)}], 1.0, "passed"),
    ("output-limit", fence("while True:\n    print('x' * 10000)"), ADD_TESTS, 0.0,
     "output limit"),
    ("io-output-limit", fence("while True:\n    print('x' * 10000)"), SUM_IO, 0.0,
     "output limit"),
]


@pytest.mark.parametrize("completion, tests, score, reason", [c[1:] for c in VERDICT_CASES],
                         ids=[c[0] for c in VERDICT_CASES])
def test_verify_code(completion, tests, score, reason):
    verdict = verify_code(completion, tests, timeout=10.0)
    assert (verdict.score, verdict.reason) == (score, reason)
    if reason != "no code found":
        assert verdict.parsed == extract_program(completion)


@pytest.mark.parametrize("tests", [ADD_TESTS, SUM_IO], ids=["asserts", "io"])
def test_timeout_is_bounded(tests):
    start = time.monotonic()
    verdict = verify_code(fence("while True:\n    pass"), tests, timeout=1.0)
    assert (verdict.score, verdict.reason) == (0.0, "timeout")
    assert time.monotonic() - start < 5.0
    result = run_tests("import time\ntime.sleep(60)", tests, timeout=1.0)
    assert result.failures[0] == "timeout" and result.passed == 0


def test_run_tests_reports_each_failure():
    result = run_tests("def add(a, b):\n    return a * b\n", ADD_TESTS)
    assert isinstance(result, CodeResult)
    assert (result.passed, result.total, result.reason) == (1, 3, "tests failed: 2/3")
    assert result.failures == [
        "test 0: AssertionError at line 1: assert add(1, 2) == 3",
        "test 1: AssertionError at line 1: assert add(-1, 1) == 0",
    ]
    assert result.isolation == isolation_level()


def test_run_tests_io_failure_quotes_outputs_and_keeps_stderr():
    program = "import sys\nprint('oops', file=sys.stderr)\nprint(int(input().split()[0]) * 2)\n"
    result = run_tests(program, SUM_IO)
    assert (result.passed, result.total) == (0, 2)
    assert result.failures[0] == "test 0: wrong output: expected '3', got '2'"
    assert result.stderr.count("oops") == 2


@pytest.mark.parametrize("tests", [[], [1, 2], [{"input": "1"}], ["assert 1", {"input": "", "output": ""}]],
                         ids=["empty", "not-strings", "io-without-output", "mixed"])
def test_malformed_tests_raise(tests):
    with pytest.raises(ValueError):
        verify_code(fence(ADD_GOLD), tests)


# --- concurrency ----------------------------------------------------------------------------


def test_batch_keeps_order_and_mixes_forms():
    completions = [fence(f"def add(a, b):\n    return a + b + {i % 2}") for i in range(12)]
    completions += [fence(SUM_GOLD), fence("print(0)")]
    tests = [ADD_TESTS] * 12 + [SUM_IO, SUM_IO]
    verdicts = verify_code_batch(completions, tests, timeout=10.0, workers=4)
    assert [v.score for v in verdicts] == [1.0, 0.0] * 6 + [1.0, 0.0]


def test_batch_length_mismatch_raises():
    with pytest.raises(ValueError):
        verify_code_batch(["a"], [])


def test_works_from_asyncio_threads():
    async def main():
        return await asyncio.gather(*(
            asyncio.to_thread(verify_code, fence(f"def add(a, b):\n    return a + b + {i}"),
                              ADD_TESTS) for i in range(6)))

    verdicts = asyncio.run(main())
    assert [v.reason for v in verdicts] == ["passed"] + ["tests failed: 3/3"] * 5


def test_isolation_level_is_the_strongest_available_here():
    level = isolation_level()
    assert level in ISOLATION_LEVELS
    if os.geteuid() == 0 and shutil.which("unshare"):
        assert level == "namespaces"


# --- real data ------------------------------------------------------------------------------

HUMANEVAL_IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/53", "HumanEval/161"]


@pytest.fixture(scope="module")
def humaneval_problems():
    if not HUMANEVAL.exists():
        pytest.skip(f"{HUMANEVAL} not present")
    with gzip.open(HUMANEVAL, "rt") as f:
        rows = {row["task_id"]: row for row in map(json.loads, f)}
    return [rows[i] for i in HUMANEVAL_IDS]


def _humaneval_tests(problem: dict) -> list[str]:
    return [problem["test"] + f"\n\ncheck({problem['entry_point']})\n"]


def test_humaneval_canonical_passes_and_return_none_fails(humaneval_problems):
    gold = [fence(p["prompt"] + p["canonical_solution"]) for p in humaneval_problems]
    wrong = [fence(p["prompt"] + "    return None\n") for p in humaneval_problems]
    tests = [_humaneval_tests(p) for p in humaneval_problems]
    verdicts = verify_code_batch(gold + wrong, tests + tests)
    n = len(humaneval_problems)
    assert [v.reason for v in verdicts[:n]] == ["passed"] * n
    assert [v.reason for v in verdicts[n:]] == ["tests failed: 1/1"] * n
    failure = run_tests(humaneval_problems[0]["prompt"] + "    return None\n",
                        _humaneval_tests(humaneval_problems[0])).failures[0]
    assert failure.startswith("test 0: AssertionError at line ")
    assert "assert candidate(" in failure


def test_timeout_before_the_sandbox_starts_is_a_verdict():
    result = run_tests("def add(a, b):\n    return a + b\n", ADD_TESTS, timeout=0.001)
    assert (result.passed, result.reason, result.failures[0]) == (0, "timeout", "timeout")
