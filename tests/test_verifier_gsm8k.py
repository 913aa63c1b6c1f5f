"""GSM8K numeric verifier: gold answers score 1, near misses and garbage score 0, fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rlvr.verifiers.gsm8k import verify_gsm8k

GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")
SOLUTION = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"


@pytest.mark.parametrize(
    "completion, reference",
    [
        pytest.param("#### 18", "18", id="marker"),
        pytest.param("So the total is 18.", "18", id="last-number-with-period"),
        pytest.param("The answer is $1,234,567.", "1234567", id="commas-and-dollar"),
        pytest.param("It costs €12.50 in total", "12.5", id="euro-decimal"),
        pytest.param("£7", 7, id="pound-int-reference"),
        pytest.param("#### 18.00", "18", id="trailing-00"),
        pytest.param("#### 18.0", 18.0, id="trailing-0-float-reference"),
        pytest.param("answer: +5", "5", id="leading-plus"),
        pytest.param("The change is -$5", "-5", id="negative-before-currency"),
        pytest.param("The change is $-5", "-5", id="negative-after-currency"),
        pytest.param("The change is \u22125", "-5", id="unicode-minus"),
        pytest.param("half: 0.5", "1/2", id="decimal-vs-fraction"),
        pytest.param("a third, 1/3", "2/6", id="fraction-vs-fraction"),
        pytest.param("#### 12345678901234567890", "12345678901234567890", id="big-int"),
        pytest.param("Step 1: 5 apples, step 2: 7 more.\n#### 12", "12", id="marker-beats-earlier"),
        pytest.param("#### 3\nWait, no.\n#### 4", "4", id="last-marker-wins"),
        pytest.param("He has 10 then 12 then 18", SOLUTION, id="gsm8k-solution-reference"),
        pytest.param("It is 50% off; you pay 25", 25, id="percent-ignored"),
        pytest.param("list: 1,2,3", "3", id="non-thousands-commas-are-a-list"),
    ],
)
def test_correct_answers_score_one(completion, reference):
    verdict = verify_gsm8k(completion, reference)
    assert verdict.score == 1.0, verdict
    assert verdict.reason == "correct"


@pytest.mark.parametrize(
    "completion, reference, parsed",
    [
        pytest.param("#### 18", "18.5", "18", id="int-vs-decimal"),
        pytest.param("#### 18.5", "18", "18.5", id="decimal-vs-int"),
        pytest.param(
            "#### 12345678901234567891", "12345678901234567890", "12345678901234567891", id="big-int-off-by-one"
        ),
        pytest.param("#### -18", "18", "-18", id="sign"),
        pytest.param("18 is tempting but #### 19", SOLUTION, "19", id="marker-is-the-answer"),
        pytest.param("The answer is 18, I checked 3 times", "18", "3", id="last-number-is-read"),
        pytest.param("#### 0.1", 0.10000001, "0.1", id="no-float-slop"),
        pytest.param("1,2345", "12345", "2345", id="bad-thousands-group"),
    ],
)
def test_wrong_answers_score_zero(completion, reference, parsed):
    verdict = verify_gsm8k(completion, reference)
    assert verdict.score == 0.0
    assert verdict.reason == "wrong answer"
    assert verdict.parsed == parsed


@pytest.mark.parametrize(
    "completion",
    [
        pytest.param("", id="empty"),
        pytest.param("I don't know.", id="words"),
        pytest.param("#### eighteen", id="marker-without-number"),
        pytest.param("x2 y3", id="digits-glued-to-words"),
        pytest.param("1" * 100_000, id="100k-digits"),
        pytest.param(None, id="not-a-string"),
    ],
)
def test_no_number(completion):
    verdict = verify_gsm8k(completion, "18")
    assert (verdict.score, verdict.reason) == (0.0, "no number found")


@pytest.mark.parametrize("reference", ["no number here", float("nan"), None, True])
def test_bad_reference_is_a_zero_not_an_exception(reference):
    assert verify_gsm8k("#### 18", reference).reason == "bad reference"


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("1," * 50_000, id="commas"),
        pytest.param("$" * 100_000, id="dollars"),
        pytest.param("-" * 100_000 + "5", id="minuses"),
        pytest.param("1." * 50_000, id="dots"),
        pytest.param("#### " + "9" * 100_000, id="marker-then-digits"),
        pytest.param("#" * 100_000, id="hashes"),
    ],
)
def test_hostile_input_is_fast(hostile):
    start = time.perf_counter()
    verdict = verify_gsm8k(hostile, "18")
    # Linear scanning takes milliseconds; a backtracking regex would take seconds to hours.
    # The bound leaves room for a loaded CI machine (throughput is bench_verifiers.py's).
    assert time.perf_counter() - start < 0.5
    assert verdict.score == 0.0


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="GSM8K test split not present")
def test_every_gsm8k_solution_matches_its_own_answer():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip()
        assert verify_gsm8k(row["answer"], final).score == 1.0, row["answer"]
        assert verify_gsm8k(f"The answer is {final}.", row["answer"]).score == 1.0
