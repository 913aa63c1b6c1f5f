"""pass@k and maj@k: the two numbers papers report for sampled evaluation.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
Trained on Code", eq. 1): with ``n`` samples of a task of which ``c`` are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that a random k-subset of the n samples holds at least one correct one,
averaged over tasks. The binomials overflow floats for n in the hundreds, so it is
computed as their product form, ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (the same
identity as the paper's numpy snippet), which stays in [0, 1] and never forms a large
number.

maj@k (majority vote, "self-consistency", Wang et al. 2022) takes the most frequent parsed
answer among a task's samples and scores the task by whether that answer is right.
Samples with no parsed answer (``info["parsed"]`` None) do not vote; a task where none
voted scores 0. Ties go to the tied answer that appeared first (the lowest sample index),
so the result depends only on the sample order, which the seed fixes; papers rarely say
how they break ties, and any fixed rule is as good as another for a mean over tasks.
Answers are compared by a canonical key (``answer_key``): strings stripped, anything else
by its JSON (or ``repr``) form, so ``"42"`` and ``" 42"`` vote together but ``42`` and
``"42"`` do not (a verifier returns one type for one environment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k of one task with ``c`` correct samples out of ``n`` (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def report_ks(num_samples: int) -> list[int]:
    """Return the k that are reported for ``num_samples`` samples: every power of two up to it, and itself."""
    ks, k = [], 1
    while k <= num_samples:
        ks.append(k)
        k *= 2
    if ks[-1] != num_samples:
        ks.append(num_samples)
    return ks


def answer_key(parsed: Any) -> str | None:
    """Return the canonical form answers are counted by, or None for no answer (see the module docstring)."""
    if parsed is None:
        return None
    if isinstance(parsed, str):
        stripped = parsed.strip()
        return "s:" + stripped if stripped else None
    try:
        return "j:" + json.dumps(parsed, sort_keys=True)
    except (TypeError, ValueError):
        return "r:" + repr(parsed)


def majority_vote(parsed: Sequence[Any], correct: Sequence[bool]) -> tuple[Any, bool]:
    """Return (the winning parsed answer, whether it is correct) of one task's samples.

    ``correct[i]`` says whether sample ``i`` was right; the winner is right when its first
    sample was (samples with the same parsed answer get the same verdict). (None, False)
    when no sample parsed an answer.
    """
    if len(parsed) != len(correct):
        raise ValueError(f"{len(parsed)} parsed answers for {len(correct)} verdicts")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, p in enumerate(parsed):
        key = answer_key(p)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, False
    # Most votes first, then the earliest first appearance: dict order is first appearance.
    winner = max(counts, key=lambda key: (counts[key], -first[key]))
    return parsed[first[winner]], bool(correct[first[winner]])
