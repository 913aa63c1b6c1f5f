"""The think/answer format verifier and extract_tag: one test row per rule."""

from __future__ import annotations

import time

import pytest

from rlvr.verifiers.format import extract_tag, verify_format

GOOD = "<think>\nFirst, 2 + 2.\nThat is 4.\n</think>\n<answer>4</answer>\n"


@pytest.mark.parametrize(
    "completion, reason",
    [
        pytest.param(GOOD, "correct", id="multi-line-think"),
        pytest.param("<think>a</think><answer>b</answer>", "correct", id="no-whitespace"),
        pytest.param("  \n<think>a</think>\n\n<answer>\nb\n</answer>  ", "correct",
                     id="outer-space"),
        pytest.param("<think>a</think>", "missing <answer>", id="no-answer"),
        pytest.param("<answer>b</answer>", "missing <think>", id="no-think"),
        pytest.param("<think>a<answer>b</answer>", "missing <think>", id="unclosed-think"),
        pytest.param("<think>a</think><answer>b", "missing <answer>", id="unclosed-answer"),
        pytest.param("<think>a</think><think>c</think><answer>b</answer>", "duplicate <think>",
                     id="two-thinks"),
        pytest.param("<think>a</think><answer>b</answer><answer>c</answer>", "duplicate <answer>",
                     id="two-answers"),
        pytest.param("<answer>b</answer><think>a</think>", "out of order", id="swapped"),
        pytest.param("<think>a<answer>b</answer></think>", "out of order", id="nested"),
        pytest.param("</think>a<think><answer>b</answer>", "out of order", id="close-before-open"),
        pytest.param("<think> \n </think><answer>b</answer>", "empty <think>", id="blank-think"),
        pytest.param("<think>a</think><answer></answer>", "empty <answer>", id="empty-answer"),
        pytest.param("Sure! <think>a</think><answer>b</answer>", "text outside tags",
                     id="text-before"),
        pytest.param("<think>a</think> so <answer>b</answer>", "text outside tags",
                     id="text-between"),
        pytest.param("<think>a</think><answer>b</answer> Hope this helps", "text outside tags",
                     id="text-after"),
        pytest.param("<THINK>a</THINK><answer>b</answer>", "missing <think>", id="case-sensitive"),
        pytest.param("", "missing <think>", id="empty"),
        pytest.param(None, "not a string", id="none"),
    ],
)
def test_shape_rules(completion, reason):
    verdict = verify_format(completion)
    assert verdict.reason == reason
    assert verdict.score == (1.0 if reason == "correct" else 0.0)


def test_correct_verdict_carries_the_contents():
    verdict = verify_format(GOOD, "ignored reference")
    assert verdict.parsed == {"think": "First, 2 + 2.\nThat is 4.", "answer": "4"}


@pytest.mark.parametrize(
    "completion, tags, reason",
    [
        pytest.param("<reasoning>r</reasoning><solution>s</solution>", ("reasoning", "solution"),
                     "correct", id="custom-pair"),
        pytest.param("<think>a</think><answer>b</answer>", ("reasoning", "solution"),
                     "missing <reasoning>", id="default-tags-fail-custom"),
        pytest.param("<a>1</a><b>2</b><c>3</c>", ("a", "b", "c"), "correct", id="three-tags"),
        pytest.param("<a>1</a><c>3</c><b>2</b>", ("a", "b", "c"), "out of order",
                     id="three-swapped"),
    ],
)
def test_configurable_tags(completion, tags, reason):
    assert verify_format(completion, tags=tags).reason == reason


@pytest.mark.parametrize(
    "completion, tag, expected",
    [
        pytest.param(GOOD, "answer", "4", id="answer"),
        pytest.param(GOOD, "think", "First, 2 + 2.\nThat is 4.", id="think"),
        pytest.param("<answer>1</answer> then <answer> 2 </answer>", "answer", "2", id="last-wins"),
        pytest.param("<answer>1</answer><answer>2", "answer", "1", id="unclosed-last"),
        pytest.param("no tags", "answer", None, id="absent"),
        pytest.param("</answer><answer>", "answer", None, id="reversed"),
        pytest.param(None, "answer", None, id="none"),
    ],
)
def test_extract_tag(completion, tag, expected):
    assert extract_tag(completion, tag) == expected


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("<think>" * 20_000, id="many-opens"),
        pytest.param("<think>" + "x" * 100_000 + "</think><answer>1</answer>", id="long-think"),
        pytest.param("<" * 100_000, id="angle-brackets"),
    ],
)
def test_hostile_input_is_fast(hostile):
    start = time.perf_counter()
    verify_format(hostile)
    extract_tag(hostile, "answer")
    assert time.perf_counter() - start < 0.05


def test_at_least_20k_verdicts_per_second():
    completions = [GOOD.replace("4", str(i)) for i in range(500)] * 20
    completions[::3] = ["text " + c for c in completions[::3]]
    best = 0.0
    for _ in range(3):  # best of three: the machine is shared
        start = time.perf_counter()
        for c in completions:
            verify_format(c)
        best = max(best, len(completions) / (time.perf_counter() - start))
    assert best >= 20_000
