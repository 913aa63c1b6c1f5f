"""pass@k against brute force over k-subsets, maj@k against a hand-made table with ties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from rlvr.trainer.bookkeeping.passk import answer_key, majority_vote, pass_at_k, report_ks


def brute_force_pass_at_k(correct: list[bool], k: int) -> Fraction:
    """The fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return Fraction(sum(any(correct[i] for i in s) for s in subsets), len(subsets))


# Small table: each row is one task's samples in order (1 = correct).
TABLE = [
    [0, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 1, 0],
    [1, 1, 1, 0, 0, 0],
    [0, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1],
]


@pytest.mark.parametrize("k", range(1, 7))
def test_pass_at_k_matches_brute_force_per_task_and_averaged(k):
    brute = [brute_force_pass_at_k([bool(x) for x in row], k) for row in TABLE]
    for row, expected in zip(TABLE, brute):
        assert pass_at_k(len(row), sum(row), k) == pytest.approx(float(expected), abs=1e-12)
    mean = sum(pass_at_k(len(r), sum(r), k) for r in TABLE) / len(TABLE)
    assert mean == pytest.approx(float(sum(brute) / len(brute)), abs=1e-12)


def test_pass_at_k_is_the_closed_form_and_stable_for_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    # C(2000, 1000) overflows a float; the product form does not.
    value = pass_at_k(2000, 3, 1000)
    assert 0.0 <= value <= 1.0 and value == pytest.approx(1 - 0.5**3, abs=1e-3)
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize(
    "num_samples, ks", [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (10, [1, 2, 4, 8, 10]), (3, [1, 2, 3])]
)
def test_reported_ks_are_powers_of_two_and_k_itself(num_samples, ks):
    assert report_ks(num_samples) == ks


# Hand-made maj@k table: (parsed answers in sample order, verdicts, expected winner, expected correct).
MAJ_TABLE = [
    (["5", "5", "7"], [True, True, False], "5", True),                # clear majority, right
    (["7", "5", "7"], [False, True, False], "7", False),              # clear majority, wrong
    (["7", "5", "5", "7"], [False, True, True, False], "7", False),   # 2-2 tie: "7" came first
    (["5", "7", "7", "5"], [True, False, False, True], "5", True),    # the same tie, "5" first
    ([None, None, "3", None], [False, False, True, False], "3", True),  # no answer does not vote
    ([None, None], [False, False], None, False),                      # nobody voted: wrong
    ([" 4", "4 ", "9", "9", "9"], [True, True, False, False, False], "9", False),  # stripped: 2 vs 3
    (["", "", "2"], [False, False, True], "2", True),                 # an empty answer is no answer
    ([1, "1", 1], [True, False, True], 1, True),                      # 1 and "1" are different answers
]  # fmt: skip


@pytest.mark.parametrize("parsed, correct, winner, right", MAJ_TABLE, ids=[str(i) for i in range(len(MAJ_TABLE))])
def test_majority_vote_on_a_hand_made_table_with_ties(parsed, correct, winner, right):
    got, ok = majority_vote(parsed, correct)
    assert answer_key(got) == answer_key(winner) and ok is right


def test_maj_at_k_of_the_table():
    maj = sum(majority_vote(p, c)[1] for p, c, _, _ in MAJ_TABLE) / len(MAJ_TABLE)
    assert maj == pytest.approx(5 / 9)
