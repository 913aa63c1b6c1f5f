r"""The last answer counts, and hedging never pays: math and GSM8K verifiers and envs.

One table per verifier, each row a completion, a reference and the expected score and
reason: self-corrections score as their last answer, several boxes are read as the last
one (or as one multi-part answer against a reference of several values), hedges in words
and sets, lists, intervals or ``\pm`` where one value is asked for score 0, and sets and
tuples as references still compare as one. Then the property the tables illustrate: no
hedge scores 1 against both of the values it offers.
"""

from __future__ import annotations

import pytest

from rlvr.envs.base import Task
from rlvr.envs.registry import make_env
from rlvr.verifiers.gsm8k import verify_gsm8k
from rlvr.verifiers.math import verify_math, verify_math_batch, warm_up


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    warm_up()


OK, WRONG, SEVERAL = (1.0, "correct"), (0.0, "wrong answer"), (0.0, "several answers")

MATH_CASES = [
    # self-correction: the last box is the answer
    pytest.param(r"First \boxed{5}, but actually the final answer is \boxed{7}.", "7", OK, id="self-correction"),
    pytest.param(r"First \boxed{5}, but actually the final answer is \boxed{7}.", "5", WRONG, id="corrected-away"),
    pytest.param(r"\boxed{5}\boxed{7}", "7", OK, id="adjacent-boxes-last"),
    pytest.param(r"\boxed{5}\boxed{7}", "5", WRONG, id="adjacent-boxes-not-first"),
    pytest.param(r"\boxed{5} or \boxed{7}", "5", WRONG, id="boxes-or-not-first"),
    pytest.param(r"\boxed{\{1,3\}}, no wait: \boxed{\{1,-2\}}", r"\{1,-2\}", OK, id="set-self-correction"),
    # several candidates in the last box, one value asked for
    pytest.param(r"\boxed{5, 7}", "7", SEVERAL, id="box-list"),
    pytest.param(r"\boxed{5 \text{ or } 7}", "7", SEVERAL, id="box-or-words"),
    pytest.param(r"\boxed{7 \text{ (or } 5)}", "5", SEVERAL, id="box-or-parenthetical"),
    pytest.param(r"\boxed{5 \lor 7}", "7", SEVERAL, id="box-lor"),
    pytest.param(r"\boxed{5 \cup 7}", "7", SEVERAL, id="box-cup"),
    pytest.param(r"\boxed{\{5, 7\}}", "7", SEVERAL, id="box-set"),
    pytest.param(r"\boxed{[5, 7]}", "7", SEVERAL, id="box-interval"),
    pytest.param(r"\boxed{\pm 7}", "7", SEVERAL, id="box-pm"),
    pytest.param(r"\boxed{x = 5 = 7}", "7", SEVERAL, id="equation-chain"),
    pytest.param(r"\boxed{5 = 7}", "7", SEVERAL, id="constant-relation"),
    pytest.param(r"\boxed{x \in \{5, 7\}}", "7", SEVERAL, id="member-of-set"),
    pytest.param(r"\boxed{A \text{ or } B}", "A", SEVERAL, id="choice-or"),
    pytest.param(r"\boxed{0.5 \text{ or } \frac{1}{2}}", r"\frac{1}{2}", SEVERAL, id="one-value-two-ways"),
    # one value, committed (not hedges)
    pytest.param(r"\boxed{x = 7}", "7", OK, id="equation-rhs"),
    pytest.param(r"\boxed{\{7\}}", "7", OK, id="one-element-set"),
    pytest.param(r"\boxed{10,455}", "10455", OK, id="thousands-comma"),
    pytest.param(r"\boxed{32, 349}", "32349", SEVERAL, id="spaced-comma-is-a-list"),
    # hedges in words, no box
    pytest.param("The answer is 5 or 7", "5", SEVERAL, id="words-or-first"),
    pytest.param("The answer is 5 or 7", "7", SEVERAL, id="words-or-last"),
    pytest.param("The answer is $5$ or $7$", "7", SEVERAL, id="latex-or"),
    pytest.param("So $x = 5$ or maybe $x = 7$.", "7", SEVERAL, id="latex-equations-or"),
    pytest.param("It is 5 or 7.\nChecking: the answer is 7.", "7", OK, id="hedge-then-commit"),
    pytest.param("Two or more tries later, the answer is 7", "7", OK, id="or-not-between-answers"),
    # references of several values compare as one, inside the last box
    pytest.param(r"\boxed{\{2, 1\}}", r"\{1, 2\}", OK, id="set-reference"),
    pytest.param(r"\boxed{2, 1}", "1, 2", OK, id="list-reference"),
    pytest.param(r"\boxed{(3, 4)}", "(3, 4)", OK, id="tuple-reference"),
    pytest.param(r"\boxed{(4, 3)}", "(3, 4)", WRONG, id="tuple-reference-order"),
    pytest.param(r"The roots are \boxed{1} and \boxed{-2}.", r"\{1, -2\}", OK, id="boxes-make-the-set"),
    pytest.param(r"\boxed{1}, \boxed{-2}, \boxed{3}", r"\{1, -2\}", WRONG, id="boxes-extra-element"),
    pytest.param(r"\boxed{1, -2, 3}", r"\{1, -2\}", WRONG, id="set-extra-element"),
    pytest.param(r"\boxed{\{1,-2\}}, or \boxed{\{1,3\}}", r"\{1,-2\}", WRONG, id="sets-or-last-wrong"),
    pytest.param(r"\boxed{(3,4),(3,5)}", "(3,4)", WRONG, id="tuples-hedged"),
    pytest.param(r"\boxed{(11,7) \text{ or } (7,11)}", "(11,7) or (7,11)", OK, id="reference-says-or"),
]


@pytest.mark.parametrize("completion, reference, expected", MATH_CASES)
def test_math_last_answer_and_hedges(completion, reference, expected):
    verdict = verify_math(completion, reference)
    assert (verdict.score, verdict.reason) == expected, verdict


def test_math_parsed_says_what_was_taken():
    assert verify_math(r"\boxed{5}, no: \boxed{7}", "5").parsed == "7"
    assert verify_math(r"\boxed{1} and \boxed{-2}", r"\{1,-2\}").parsed == "1,-2"
    assert verify_math(r"\boxed{5 \text{ or } 7}", "7").parsed == r"5 \text{ or } 7"


GSM8K_CASES = [
    pytest.param("#### 3\nWait, that is wrong.\n#### 4", "4", OK, id="self-correction"),
    pytest.param("#### 3\nWait, that is wrong.\n#### 4", "3", WRONG, id="corrected-away"),
    pytest.param("#### 5 #### 7", "7", OK, id="two-markers-one-line"),
    pytest.param("####\n18", "18", OK, id="number-on-the-next-line"),
    pytest.param("#### $1,234.50 in total", "1234.5", OK, id="one-number-with-words"),
    pytest.param("#### 5 or 7", "5", SEVERAL, id="marker-or-first"),
    pytest.param("#### 5 or 7", "7", SEVERAL, id="marker-or-last"),
    pytest.param("#### 5, 7", "5", SEVERAL, id="marker-list"),
    pytest.param("#### 5-7", "5", SEVERAL, id="marker-range"),
    pytest.param("#### 18 (9 * 2)", "18", SEVERAL, id="marker-with-working"),
    pytest.param("#### 18 or so", "18", SEVERAL, id="marker-or-so"),
    pytest.param("The answer is 5 or 7", "7", SEVERAL, id="fallback-or"),
    pytest.param("The answer is 5 or 7", "5", SEVERAL, id="fallback-or-first"),
    pytest.param("It is 5 apples, or maybe 7", "7", SEVERAL, id="fallback-or-maybe"),
    pytest.param("x = 5 or x = 7", "7", SEVERAL, id="fallback-equations-or"),
    pytest.param("5 or 7? Checking again, it is 7.", "7", OK, id="hedge-then-commit"),
    pytest.param("Two or more boxes: 7", "7", OK, id="or-not-between-numbers"),
    pytest.param("list: 1,2,3", "3", OK, id="list-reads-its-last"),
    pytest.param("list: 1,2,3", "1", WRONG, id="list-not-its-first"),
]


@pytest.mark.parametrize("completion, reference, expected", GSM8K_CASES)
def test_gsm8k_last_answer_and_hedges(completion, reference, expected):
    verdict = verify_gsm8k(completion, reference)
    assert (verdict.score, verdict.reason) == expected, verdict


HEDGES = [
    r"\boxed{5} or \boxed{7}",
    r"\boxed{5}, \boxed{7}",
    r"\boxed{5, 7}",
    r"\boxed{5 \text{ or } 7}",
    r"\boxed{7 \text{ (or } 5)}",
    r"\boxed{5 \lor 7}",
    r"\boxed{5 \vee 7}",
    r"\boxed{5 \cup 7}",
    r"\boxed{5 = 7}",
    r"\boxed{7 = 5}",
    r"\boxed{x = 5 = 7}",
    r"\boxed{x = 5, x = 7}",
    r"\boxed{\{5, 7\}}",
    r"\boxed{[5, 7]}",
    r"\boxed{6 \pm 1}",
    r"\boxed{5 \le x \le 7}",
    r"\boxed{7 \approx 5}",
    "The answer is 5 or 7",
    "The answer is 7 or 5.",
    "The answer is $5$ or $7$",
    "$5, 7$",
    "7 or maybe 5",
]


@pytest.mark.parametrize("hedge", HEDGES)
def test_no_math_hedge_scores_against_both_values(hedge):
    five, seven = verify_math_batch([hedge, hedge], ["5", "7"])
    assert five.score + seven.score <= 1.0, (five, seven)


@pytest.mark.parametrize(
    "hedge", ["#### 5 or 7", "#### 7, 5", "5 or 7", "7 or 5", "#### 5\n#### 7", "5, 7", "#### 5/7", "x=5 or x=7"]
)
def test_no_gsm8k_hedge_scores_against_both_values(hedge):
    assert verify_gsm8k(hedge, "5").score + verify_gsm8k(hedge, "7").score <= 1.0


@pytest.mark.parametrize(
    "env_name, correction, hedge",
    [
        ("gsm8k", "#### 5\nNo, I misread it.\n#### 7", "#### 5 or 7"),
        ("math", r"First \boxed{5}, but actually the final answer is \boxed{7}.", r"\boxed{5 \text{ or } 7}"),
    ],
)
def test_envs_reward_the_correction_and_not_the_hedge(env_name, correction, hedge):
    env = make_env(env_name)
    rewards = {}
    for completion in (correction, hedge):
        env.reset(options={"index": 0})
        env.unwrapped._task = Task("t", "What is 3+4?", "7")  # a known task, to pin the numbers
        _, rewards[completion], *_ = env.step(completion)
    assert rewards == {correction: 1.0, hedge: 0.0}
