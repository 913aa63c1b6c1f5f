r"""Math answers judged by math-verify, in killable worker processes.

What is compared:

- the completion's answer is the content of its last well-formed ``\boxed{...}`` (or
  ``\fbox{...}``), brace-matched here with bounded work, not by regex; without a box,
  math-verify's own extraction (``LatexExtractionConfig`` and ``ExprExtractionConfig``:
  the last ``$...$``/``\[...\]`` or plain expression) runs on the last ``_TAIL_CHARS``
  characters;
- the reference may be a bare answer (``3/4``, ``\frac{3}{4}``, ``(1, 2)``,
  ``\left( 3, \frac{\pi}{2} \right)``), parsed as ``\boxed{answer}`` because math-verify
  reads a bare ``(1, 2)`` as the number 2; or text with LaTeX delimiters or a box
  (``$(1,2)$``, a whole solution), which math-verify's extraction reads as it is;
- equivalence is math-verify's ``verify(gold, answer)`` (gold first: the function is not
  symmetric) with its defaults: fractions, decimals to 6 places, radicals, tuples, sets,
  intervals, symbolic expressions.

Two departures, both to agree with math-verify on its own test cases: boxes that
math-verify's ``extract_boxed_content`` would join to the last one (under 10 characters
apart, or under 70 with "and"/"or"/","/";" between) are joined with commas, so
``\boxed{1} and \boxed{2}`` is the set {1, 2}; and the last box wins over math-verify's
"The final answer is $x$. I hope" pattern, which math-verify ranks above boxes (the one
disagreement left on its near-default cases). A boxed answer that is the bare reference
verbatim is scored 1 in the caller without math-verify (it would agree).

Why worker processes: sympy can run for ever on hostile input (towers of powers, huge
nesting), sometimes inside C code where no signal handler runs (its gmpy2 or flint
backends, when installed), and math-verify's own timeouts use ``signal.alarm``, which only
works in a main thread. So math-verify's timeouts are off (``None``) and each item runs in
:mod:`rlvr.verifiers.pool`, whose workers raise a soft timeout in their main thread and
are SIGKILLed at ``timeout + 0.5 s``. Either way the verdict is
``Verdict(0, ..., "timeout")``, and the call is safe from any thread and from asyncio.
The bound counts from when a worker starts the item, not from when the call was made.

Reasons: "correct", "wrong answer", "no answer found", "timeout", and rarer ones:
"answer too long" (a box over ``_MAX_ANSWER_CHARS`` characters is not parsed at all),
"bad reference", "verifier error", "verifier crashed", "cancelled". ``parsed`` is the
answer string math-verify extracted (never ``str()`` of a sympy object, which can itself
hang).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from rlvr.verifiers.pool import ItemResult, shared_pool
from rlvr.verifiers.types import Verdict

_TAIL_CHARS = 4000  # math-verify's regexes have lazy quantifiers; bound their input
_MAX_ANSWER_CHARS = 2000  # longer than any real boxed answer (a 5x5 matrix is ~300)
_MAX_BOXES = 16

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE = re.compile(r"(?<!\\)[{}]")  # \{ and \} are literal braces (sets), not groups
_BARE_BOX_ARG = re.compile(r"\s+([^\s${}]+)")  # "\boxed 5"
_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")

# Both extraction targets, as the issue asks; boxed answers come first by LatexExtraction's
# default priority.
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


@dataclass(frozen=True)
class MathItem:
    """What a worker needs: the text math-verify parses from each side."""

    candidate: str  # "\boxed{<answer>}" or the completion's tail
    gold: str  # "\boxed{<reference>}", or the reference itself when it has delimiters


@dataclass(frozen=True)
class _Box:
    content: str | None  # None: no well-formed box here
    start: int = -1  # index of the backslash of the command
    end: int = -1  # index just past the closing brace
    too_long: bool = False


def _box_at(text: str, position: int) -> _Box:
    """Read the box whose command starts at ``position``."""
    command = _BOX_COMMAND.match(text, position)
    if command is None:
        return _Box(None)
    start = command.end()
    if not text.startswith("{", start):
        bare = _BARE_BOX_ARG.match(text, start, start + _MAX_ANSWER_CHARS)
        return _Box(bare.group(1), position, bare.end()) if bare else _Box(None)
    depth = 0
    window_end = start + _MAX_ANSWER_CHARS + 2
    for brace in _BRACE.finditer(text, start, window_end):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return _Box(text[start + 1 : brace.start()].strip(), position, brace.end())
    return _Box(None, too_long=len(text) > window_end)


def _previous_box(text: str, end: int) -> _Box | None:
    """Return the last box starting before ``end`` (possibly malformed), or None."""
    position = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
    return None if position < 0 else _box_at(text, position)


def _joins(text: str, earlier: _Box, later: _Box) -> bool:
    r"""Return whether ``earlier`` is part of the same answer as ``later``.

    math-verify's rule (latex2sympy2_extended ``extract_boxed_content``): boxes separated by
    under 10 characters, or by under 70 characters holding "and", "or", "," or ";" when
    their contents differ, form one answer, as in ``\boxed{1} and \boxed{2}``.
    """
    between = text[earlier.end : later.start]
    if len(between) < 10:
        return True
    return (
        earlier.content != later.content
        and len(between) < 70
        and bool(_SEPARATOR.search(between))
    )


def _answer_box(text: str) -> _Box:
    r"""Return the answer a completion boxed: its last well-formed ``\boxed``/``\fbox``.

    Earlier boxes that math-verify would join to it (a multi-part answer) are joined with
    commas, so ``\boxed{1} and \boxed{2}`` reads as ``1,2``. Unclosed boxes (a truncated
    generation) are skipped. Work is bounded: at most ``_MAX_BOXES`` boxes are read.
    """
    last: _Box | None = None
    end = len(text)
    for _ in range(_MAX_BOXES):
        box = _previous_box(text, end)
        if box is None or box.too_long:
            return box or _Box(None)
        if box.content is not None:
            last = box
            break
        end = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
    if last is None:
        return _Box(None)
    parts, current = [last.content], last
    for _ in range(_MAX_BOXES):
        earlier = _previous_box(text, current.start)
        if earlier is None or earlier.content is None or earlier.end > current.start:
            break
        if not _joins(text, earlier, current):
            break
        if earlier.content != parts[-1]:  # math-verify drops a repeated neighbour
            parts.append(earlier.content)
        current = earlier
    content = ",".join(reversed(parts))
    if len(content) > _MAX_ANSWER_CHARS:
        return _Box(None, too_long=True)
    return _Box(content, current.start, last.end)


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last well-formed ``\boxed{}`` or ``\fbox{}``, or None."""
    if not isinstance(text, str):
        return None
    return _answer_box(text).content


_LATEX_DELIMITER = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")


def _gold_text(reference: str) -> str:
    r"""Wrap a bare reference as ``\boxed{...}``; leave one with LaTeX delimiters as it is."""
    if _LATEX_DELIMITER.search(reference):
        return reference  # a solution or "$...$": math-verify's own extraction reads it
    return f"\\boxed{{{reference.strip()}}}"


# --------------------------------------------------------------------- worker side


@lru_cache(maxsize=1)
def _quiet_math_verify() -> None:
    # Its timeouts are off on purpose (the pool bounds time); silence the warning that says
    # so, and the per-item "Timeout during parsing" noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # GRPO scores G completions against one reference: parse it once per worker.
    return parse(gold, _EXTRACTION, parsing_timeout=None)


def _parsed_text(extracted: list) -> str | None:
    strings = [x for x in extracted if isinstance(x, str)]
    return strings[-1] if strings else None


def verify_item(item: MathItem) -> Verdict:
    """Run math-verify on one item in this process, with no timeout (workers run this)."""
    _quiet_math_verify()
    gold = _parse_gold(item.gold)
    if not gold:
        return Verdict(0.0, None, "bad reference")
    answer = parse(item.candidate, _EXTRACTION, parsing_timeout=None)
    if not answer:
        return Verdict(0.0, None, "no answer found")
    parsed = _parsed_text(answer)
    if verify(gold, answer, timeout_seconds=None):
        return Verdict(1.0, parsed, "correct")
    return Verdict(0.0, parsed, "wrong answer")


# --------------------------------------------------------------------- caller side


@dataclass(frozen=True)
class _Prepared:
    item: MathItem | None  # None when the verdict is known without math-verify
    verdict: Verdict | None = None
    boxed: str | None = None


def _prepare(completion: str, answer: str) -> _Prepared:
    if not isinstance(answer, str) or not answer.strip():
        return _Prepared(None, Verdict(0.0, None, "bad reference"))
    if not isinstance(completion, str) or not completion.strip():
        return _Prepared(None, Verdict(0.0, None, "no answer found"))
    box = _answer_box(completion)
    if box.too_long:
        return _Prepared(None, Verdict(0.0, None, "answer too long"))
    gold = _gold_text(answer)
    if box.content is not None and gold == f"\\boxed{{{box.content}}}":
        # The boxed text is the reference verbatim: math-verify would agree, and skipping
        # it (no sympy, no pipe) makes the common correct answer in GRPO ~free.
        return _Prepared(None, Verdict(1.0, box.content, "correct"))
    if box.content is not None:
        candidate = f"\\boxed{{{box.content}}}"
    else:
        candidate = completion[-_TAIL_CHARS:]
    return _Prepared(MathItem(candidate, gold), boxed=box.content)


_FAILURE_REASONS = {
    "timeout": "timeout",
    "error": "verifier error",
    "crashed": "verifier crashed",
    "cancelled": "cancelled",
}


def _prepare_all(completions: Sequence[str], answers: Sequence[str]) -> list[_Prepared]:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return [_prepare(c, a) for c, a in zip(completions, answers)]


def _assemble(prepared: list[_Prepared], results: list[ItemResult]) -> list[Verdict]:
    """Merge pool results (one per prepared item that needed math-verify, in order)."""
    pending = iter(results)
    verdicts = []
    for p in prepared:
        if p.item is None:
            verdicts.append(p.verdict)
            continue
        result = next(pending)
        if result.ok:
            verdicts.append(result.value)
        else:  # parsed: the boxed text, if any, so a timeout still shows what was tried
            verdicts.append(Verdict(0.0, p.boxed, _FAILURE_REASONS[result.status]))
    return verdicts


def verify_math_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout: float = 5.0,
    workers: int | None = None,
) -> list[Verdict]:
    """Verify ``completions[i]`` against ``answers[i]`` in the shared worker pool.

    ``timeout`` bounds each item's wall clock once a worker starts it (the worker is killed
    0.5 s later if it does not stop by itself); ``workers`` picks the shared pool's size
    (default: ``$RLVR_VERIFIER_WORKERS`` or the CPU count).
    """
    prepared = _prepare_all(completions, answers)
    items = [p.item for p in prepared if p.item is not None]
    results = shared_pool(workers).map(verify_item, items, timeout=timeout) if items else []
    return _assemble(prepared, results)


async def averify_math_batch(
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout: float = 5.0,
    workers: int | None = None,
) -> list[Verdict]:
    """Asyncio form of :func:`verify_math_batch`; never blocks the event loop."""
    prepared = _prepare_all(completions, answers)
    items = [p.item for p in prepared if p.item is not None]
    results = await shared_pool(workers).amap(verify_item, items, timeout=timeout) if items else []
    return _assemble(prepared, results)


def verify_math(completion: str, answer: str, *, timeout: float = 5.0) -> Verdict:
    """Verify one completion (see :func:`verify_math_batch`); safe from any thread."""
    return verify_math_batch([completion], [answer], timeout=timeout)[0]


def warm_up(workers: int | None = None) -> None:
    """Start the shared pool's workers and import math-verify in them (for benchmarks)."""
    pool = shared_pool(workers)
    pool.wait_ready()
    n = 4 * pool.workers
    verify_math_batch(["$1$"] * n, ["1"] * n, workers=pool.workers)
