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

The last answer counts, and hedging never pays. RL teaches a model to correct itself, so
``First \boxed{5}, but actually \boxed{7}`` is the answer 7; and a policy must never gain
by offering several candidates. The rule, in order:

1. Only the last box is the answer; earlier boxes are working (``parsed`` is its content).
2. A reference of several values (math-verify parses it to a set, tuple, list, interval
   or union: ``\{1, 2\}``, ``(3, 4)``, ``1, 2``) compares as one, inside that last box.
   Only when that fails are earlier boxes that math-verify's ``extract_boxed_content``
   would join to the last one (under 10 characters apart, or under 70 with
   "and"/"or"/","/";" between) compared as one answer, so ``\boxed{1} and \boxed{-2}``
   is the set {1, -2}; set and tuple equality then rejects any extra candidate.
3. A reference of one value needs an answer of one value. Scored 0, reason "several
   answers": a last box, or an unboxed final expression, that math-verify parses to
   several values (``5, 7``, ``5 \text{ or } 7``, ``\pm 7``, ``\{5, 7\}``, ``[5, 7]``, a
   union, ``x = 5 = 7``, a relation between two constants such as ``5 = 7``, which
   math-verify would read as 7); a box whose text says "or" or a union (``or``,
   ``\lor``, ``\vee``, ``\cup``, which math-verify silently reads as one side) unless
   the reference says so too; and, without a box, a last line naming two answers joined
   by "or" ("the answer is 5 or 7", "$x = 5$ or $x = 7$").

So a completion scores 1 against at most one single-value reference: a hedge earns at
best what committing to its last candidate earns, and 0 when that candidate is wrong.

Departures, both to agree with math-verify on its own test cases: the joining of rule 2;
and the last box wins over math-verify's "The final answer is $x$. I hope" pattern,
which math-verify ranks above boxes (the one disagreement left on its near-default
cases). A last box that is the bare reference verbatim is scored 1 in the caller
without math-verify (it would agree).

Why worker processes: sympy can run for ever on hostile input (towers of powers, huge
nesting), sometimes inside C code where no signal handler runs (its gmpy2 or flint
backends, when installed), and math-verify's own timeouts use ``signal.alarm``, which only
works in a main thread. So math-verify's timeouts are off (``None``) and each item runs in
:mod:`rlvr.verifiers.pool`, whose workers raise a soft timeout in their main thread and
are SIGKILLed at ``timeout + 0.5 s``. Either way the verdict is
``Verdict(0, ..., "timeout")``, and the call is safe from any thread and from asyncio.
The bound counts from when a worker starts the item, not from when the call was made.

Reasons: "correct", "wrong answer", "several answers", "no answer found", "timeout", and
rarer ones: "answer too long" (a box over ``_MAX_ANSWER_CHARS`` characters is not parsed
at all), "bad reference", "verifier error", "verifier crashed", "cancelled". ``parsed`` is
what was compared: the last box's content (the joined boxes when rule 2 matched them), or
without a box the answer string math-verify extracted (never ``str()`` of a sympy object,
which can itself hang).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import FiniteSet, S, Set, Tuple
from sympy.core.relational import Relational
from sympy.logic.boolalg import BooleanFunction

from rlvr.verifiers.pool import ItemResult, shared_pool
from rlvr.verifiers.types import Verdict

_TAIL_CHARS = 4000  # math-verify's regexes have lazy quantifiers; bound their input
_MAX_ANSWER_CHARS = 2000  # longer than any real boxed answer (a 5x5 matrix is ~300)
_MAX_BOXES = 16

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE = re.compile(r"(?<!\\)[{}]")  # \{ and \} are literal braces (sets), not groups
_BARE_BOX_ARG = re.compile(r"\s+([^\s${}]+)")  # "\boxed 5"
_SEPARATOR = re.compile(r"\b(?:and|or)\b|,|;")  # math-verify's box-joining words

# Both extraction targets, as the issue asks; boxed answers come first by LatexExtraction's
# default priority.
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


@dataclass(frozen=True)
class MathItem:
    """What a worker needs: the text math-verify parses from each side, and the hedge flags."""

    candidate: str  # "\boxed{<last box>}" or the completion's tail
    gold: str  # "\boxed{<reference>}", or the reference itself when it has delimiters
    joined: str | None = None  # "\boxed{<joined boxes>}": tried for a several-value gold only
    shown: str | None = None  # the last box's content, for ``parsed``
    joined_shown: str | None = None
    says_or: bool = False  # the answer's words hedge ("or", "\lor", a union); see rule 3


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
    return earlier.content != later.content and len(between) < 70 and bool(_SEPARATOR.search(between))


def _last_box(text: str) -> _Box:
    r"""Return a completion's answer: its last well-formed ``\boxed``/``\fbox``.

    Unclosed boxes (a truncated generation) are skipped. Work is bounded: at most
    ``_MAX_BOXES`` boxes are read.
    """
    end = len(text)
    for _ in range(_MAX_BOXES):
        box = _previous_box(text, end)
        if box is None or box.too_long:
            return box or _Box(None)
        if box.content is not None:
            return box
        end = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
    return _Box(None)


def _joined_content(text: str, last: _Box) -> str | None:
    r"""Return the boxes math-verify would join to ``last``, comma-joined, or None if none.

    Rule 2 of the module docstring: ``\boxed{1} and \boxed{-2}`` reads as ``1,-2``, which
    is compared only against a reference of several values. Bounded like :func:`_last_box`.
    """
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
    return content if len(parts) > 1 and len(content) <= _MAX_ANSWER_CHARS else None


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last well-formed ``\boxed{}`` or ``\fbox{}``, or None."""
    if not isinstance(text, str):
        return None
    return _last_box(text).content


# Rule 3's words. Inside a box any "or" or union hedges (math-verify reads "5 \lor 7" and
# "5 \cup 7" as 7, "7 \text{ (or } 5)" as 5). Without a box, two answers joined by "or" on
# the last line: a number, a closing $ or \) before it, a number, $, \( or "x =" after.
# Written so that it runs in linear time ("\s*(?:,\s*)?", not "\s*,?\s*", which tries
# every split of a run of spaces): it also reads the whole reference, in the caller.
_BOX_OR = re.compile(r"\bor\b|\\(?:lor|vee|cup)(?![A-Za-z])", re.IGNORECASE)
_LINE_OR = re.compile(
    r"(?:\d|\$|\\\)|\\\])\s*(?:,\s*)?\bor\s+(?:(?:maybe|perhaps|possibly)\s+)?"
    r"(?:[-+]?\d|\$|\\\(|\\\[|[A-Za-z]\s*=)",
    re.IGNORECASE,
)
_LAST_LINE_CHARS = 500


def _last_line(text: str) -> str:
    tail = text[-_TAIL_CHARS:].rstrip()
    return tail[tail.rfind("\n") + 1 :][-_LAST_LINE_CHARS:]


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


def _value(extracted: list):
    """Return the sympy object math-verify parsed (its list also holds the string)."""
    return next((x for x in extracted if not isinstance(x, str)), None)


def _several(value) -> bool:
    r"""Return whether a parsed answer names several values (rule 3 of the module docstring).

    A set of two or more (``5, 7``, ``\pm 7``, ``5 or 7``), any other set (an interval, a
    union), a tuple or list of two or more, a Boolean combination (``x = 5 = 7``), a
    relation between two constants (``5 = 7``); ``x = {5, 7}`` by its right side. A
    one-element set is its element; a matrix is one value (a vector answer).
    """
    if isinstance(value, (list, tuple, Tuple)):
        return len(value) > 1 or any(_several(v) for v in value)
    if isinstance(value, FiniteSet):
        return len(value) > 1 or any(_several(v) for v in value)
    if isinstance(value, Set):
        return value is not S.EmptySet
    if isinstance(value, BooleanFunction):
        return True
    if isinstance(value, Relational):
        if not value.lhs.free_symbols and not value.rhs.free_symbols:
            return True
        return _several(value.rhs)
    return False


def verify_item(item: MathItem) -> Verdict:
    """Run math-verify on one item in this process, with no timeout (workers run this)."""
    _quiet_math_verify()
    gold = _parse_gold(item.gold)
    if not gold:
        return Verdict(0.0, None, "bad reference")
    one_value = not _several(_value(gold))
    answer = parse(item.candidate, _EXTRACTION, parsing_timeout=None)
    parsed = item.shown if item.shown is not None else _parsed_text(answer)
    if one_value and (item.says_or or (answer and _several(_value(answer)))):
        return Verdict(0.0, parsed, "several answers")  # rule 3
    if answer and verify(gold, answer, timeout_seconds=None):
        return Verdict(1.0, parsed, "correct")
    if item.joined is not None and not one_value:  # rule 2: a multi-part answer in boxes
        joined = parse(item.joined, _EXTRACTION, parsing_timeout=None)
        if joined and verify(gold, joined, timeout_seconds=None):
            return Verdict(1.0, item.joined_shown, "correct")
    if not answer:
        return Verdict(0.0, None, "no answer found")
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
    box = _last_box(completion)
    if box.too_long:
        return _Prepared(None, Verdict(0.0, None, "answer too long"))
    gold = _gold_text(answer)
    if box.content is None:
        # No box: math-verify reads the tail; a last line that hedges in words is flagged.
        says_or = bool(_LINE_OR.search(_last_line(completion)))
        says_or = says_or and not _LINE_OR.search(answer)
        return _Prepared(MathItem(completion[-_TAIL_CHARS:], gold, says_or=says_or))
    if gold == f"\\boxed{{{box.content}}}":
        # The last box is the reference verbatim: math-verify would agree, and skipping it
        # (no sympy, no pipe) makes the common correct answer in GRPO ~free.
        return _Prepared(None, Verdict(1.0, box.content, "correct"))
    joined = _joined_content(completion, box)
    says_or = bool(_BOX_OR.search(box.content)) and not _BOX_OR.search(answer)
    item = MathItem(
        candidate=f"\\boxed{{{box.content}}}",
        gold=gold,
        joined=None if joined is None else f"\\boxed{{{joined}}}",
        shown=box.content,
        joined_shown=joined,
        says_or=says_or,
    )
    return _Prepared(item, boxed=box.content)


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
