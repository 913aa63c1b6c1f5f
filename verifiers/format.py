"""The ``<think>...</think><answer>...</answer>`` output shape (DeepSeek-R1's format reward).

A completion has the right shape when every tag pair of ``tags`` appears exactly once, the
pairs come in the given order without nesting, each pair holds some non-whitespace text
(multi-line is fine), and nothing but whitespace lies outside the pairs. The check is
all-or-nothing (score 1 or 0): partial credit for "has an opening tag" is the kind of
lenient reward a policy learns to game.

The reason names the first problem found, in this order: ``missing <t>``,
``duplicate <t>``, ``out of order``, ``empty <t>``, ``text outside tags``; a good
completion gets ``correct``, and ``parsed`` is then a dict ``{tag: stripped content}``.

Only ``str.count`` / ``str.find`` are used (no regex), so the cost is linear in the text
with a small constant, even on 100,000-character hostile completions.

Departure: R1-style chat templates that put ``<think>`` in the prompt leave it out of the
completion; such a completion scores 0 here unless ``tags`` is changed accordingly.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlvr.verifiers.types import Verdict


def extract_tag(completion: str, tag: str) -> str | None:
    """Return the stripped content of the last ``<tag>...</tag>``, or None if there is none."""
    if not isinstance(completion, str):
        return None
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    end = completion.rfind(close_tag)
    if end < 0:
        return None
    start = completion.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return completion[start + len(open_tag) : end].strip()


def _missing_or_duplicate(completion: str, tags: Sequence[str]) -> str | None:
    for tag in tags:
        counts = completion.count(f"<{tag}>"), completion.count(f"</{tag}>")
        if min(counts) == 0:
            return f"missing <{tag}>"
        if max(counts) > 1:
            return f"duplicate <{tag}>"
    return None


def verify_format(
    completion: str, reference: object = None, *, tags: Sequence[str] = ("think", "answer")
) -> Verdict:
    """Score 1 when ``completion`` is exactly the tag pairs of ``tags`` in order.

    ``reference`` is ignored; it is there so that every verifier has the same signature.
    """
    if not isinstance(completion, str):
        return Verdict(0.0, None, "not a string")
    problem = _missing_or_duplicate(completion, tags)
    if problem:
        return Verdict(0.0, None, problem)
    contents: dict[str, str] = {}
    outside: list[str] = []
    cursor = 0  # end of the previous pair's closing tag
    for tag in tags:
        open_tag, close_tag = f"<{tag}>", f"</{tag}>"
        start, end = completion.find(open_tag), completion.find(close_tag)
        if start < cursor or end < start + len(open_tag):
            return Verdict(0.0, None, "out of order")
        outside.append(completion[cursor:start])
        contents[tag] = completion[start + len(open_tag) : end].strip()
        cursor = end + len(close_tag)
    outside.append(completion[cursor:])
    for tag in tags:
        if not contents[tag]:
            return Verdict(0.0, None, f"empty <{tag}>")
    if any(text.strip() for text in outside):
        return Verdict(0.0, None, "text outside tags")
    return Verdict(1.0, contents, "correct")
