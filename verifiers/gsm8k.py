"""GSM8K-style numeric answers: the number after the last ``####``, else the last number.

The reference is a GSM8K solution (``... #### 18``), a plain number string, or an int or
float. The completion's answer is the number on the line of its last ``####`` when it has
one (the GSM8K convention; the line may start just after a line break), otherwise the
last number in its text. Both sides are read as exact rationals
(:class:`fractions.Fraction` from the decimal string, never a float), so
``12345678901234567890`` and ``12345678901234567891`` differ and ``18`` equals ``18.00``.

The last answer counts, and hedging never pays: a completion that corrects itself
(``#### 3`` ... ``#### 4``) is scored on its last answer, and no completion can score 1
against two different references. So, reason "several answers", score 0:

- the last ``####`` line holds more than one number, or the word "or" (``#### 5 or 7``,
  ``#### 5, 7``, ``#### 5-7``, ``#### 18 (9 * 2)``): that line is the answer, and it
  must be one number;
- without a ``####``, the last number follows another number and "or" (``5 or 7``,
  ``5 apples, or maybe 7``, ``x = 5 or x = 7``). A list such as ``1,2,3`` is read as its
  last number (it commits to it exactly as a bare ``3`` would); so does "7, not 5",
  which reads 5: the fallback cannot parse negation and says so here.

What a number may look like: a sign (``-``, ``+``, or the Unicode minus), a currency
sign (``$``, ``€``, ``£``) before or after the sign, thousands separators (``1,234,567``:
groups of three only, so a list like ``1,2,3`` reads as three numbers), a decimal part,
or a simple fraction of integers ``3/4``. A trailing ``%`` or unit is ignored. A number glued to a
word (``x2``, ``abc123``) is not read.

Bounded work on hostile input: the fallback scans only the last ``_TAIL_CHARS``
characters, the ``####`` branch only the ``_TAIL_CHARS`` after the marker (the hedge
check only ``_HEDGE_WINDOW`` characters before the last number), numbers are
at most ``_MAX_DIGITS`` digits, and the regex has no nested quantifiers, so a
100,000-character completion costs microseconds. Parsed references are cached.

Departure from common practice: lm-eval's "flexible extract" also takes the last
number, but it compares strings after stripping; here ``18.0`` equals ``18``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

from rlvr.verifiers.types import Verdict

_TAIL_CHARS = 512
_MAX_DIGITS = 64
_MAX_SHOWN = 8  # numbers shown in ``parsed`` for a hedge

# One number. The lookbehind stops a match from starting inside a word or another number;
# the integer part is either comma-grouped thousands (exactly three digits per group, and
# no digit may follow the last group) or a plain run of digits.
_NUMBER = re.compile(
    r"""
    (?<![\w.])
    (?P<sign>[-+\u2212])?
    (?:[$\u20ac\u00a3]\s?(?P<sign2>[-+\u2212])?)?
    (?P<body>
        \d{1,64}/\d{1,64}(?![\d.])
      | (?:\d{1,3}(?:,\d{3}){1,21}(?![\d,]\d)|\d{1,64})(?:\.\d{1,64})?
      | \.\d{1,64}
    )
    (?!\d)
    """,
    re.VERBOSE,
)


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    body = match["body"].replace(",", "")
    negative = "-" in ((match["sign"] or "") + (match["sign2"] or "")).replace("\u2212", "-")
    try:
        value = Fraction(body)  # exact: Fraction parses "1234.50" and "3/4" without floats
    except (ValueError, ZeroDivisionError):
        return None
    return -value if negative else value


def _last_number(text: str) -> re.Match[str] | None:
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last


# "<number> [unit] [,] or [maybe] [x =]" just before the last number: two answers offered.
_HEDGE_BEFORE = re.compile(
    r"\d(?:\s*%)?(?:\s+[A-Za-z]{1,20})?\s*,?\s*\bor\s+(?:(?:maybe|perhaps|possibly)\s+)?"
    r"(?:[A-Za-z]\w{0,10}\s*=\s*)?$",
    re.IGNORECASE,
)
_HEDGE_WINDOW = 64
_OR_WORD = re.compile(r"\bor\b", re.IGNORECASE)


@dataclass(frozen=True)
class _Answer:
    """What a completion answered: its numbers (one unless it hedged), and whether it did."""

    matches: tuple[re.Match[str], ...]
    several: bool = False


def _marker_answer(text: str, marker: int) -> _Answer:
    after = text[marker + 4 : marker + 4 + _TAIL_CHARS].lstrip()
    line = after.split("\n", 1)[0]
    matches = tuple(_NUMBER.finditer(line))
    return _Answer(matches, len(matches) > 1 or bool(matches and _OR_WORD.search(line)))


def _fallback_answer(text: str) -> _Answer:
    tail = text[-_TAIL_CHARS:]
    match = _last_number(tail)
    if match is None:
        return _Answer(())
    before = tail[max(0, match.start() - _HEDGE_WINDOW) : match.start()]
    return _Answer((match,), bool(_HEDGE_BEFORE.search(before)))


def _read_answer(text: str) -> _Answer:
    marker = text.rfind("####")
    return _marker_answer(text, marker) if marker >= 0 else _fallback_answer(text)


def extract_number(text: str) -> Fraction | None:
    """Return the exact value of the answer in ``text``, or None.

    The answer is the first number on the line of the last ``####``; without a ``####``,
    the last number in the final ``_TAIL_CHARS`` characters. This reads references too, so
    it ignores the hedge rule; :func:`verify_gsm8k` applies it to completions.
    """
    answer = _read_answer(text)
    return _to_fraction(answer.matches[0]) if answer.matches else None


_reference_value = lru_cache(maxsize=65536)(extract_number)


def _reference_to_fraction(reference: str | int | float) -> Fraction | None:
    if isinstance(reference, bool):
        return None
    if isinstance(reference, int):
        return Fraction(reference)
    if isinstance(reference, float):
        # repr() is the shortest decimal that round-trips, so 0.1 means 1/10, not the binary
        # neighbour Fraction(0.1) would give.
        return Fraction(repr(reference)) if math.isfinite(reference) else None
    if isinstance(reference, str):
        return _reference_value(reference)
    return None


def _canonical(value: Fraction) -> str:
    """Show an integer as ``"18"``, a terminating decimal as ``"18.5"``, else ``"1/3"``."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:
        return str(value)
    with localcontext() as ctx:
        ctx.prec = 2 * _MAX_DIGITS + 10  # enough for any number the regex can read
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def verify_gsm8k(completion: str, answer: str | int | float) -> Verdict:
    """Score 1 when the completion's final number equals the reference exactly.

    ``parsed`` is the number read from the completion in canonical form (``"1234"``,
    ``"37/2"``; the numbers joined by ", " for a hedge); reasons are "correct", "wrong
    answer", "several answers" (see the module docstring), "no number found" and, for a
    reference with no number, "bad reference".
    """
    gold = _reference_to_fraction(answer)
    if gold is None:
        return Verdict(0.0, None, "bad reference")
    if not isinstance(completion, str):
        return Verdict(0.0, None, "no number found")
    read = _read_answer(completion)
    values = [v for v in map(_to_fraction, read.matches[:_MAX_SHOWN]) if v is not None]
    if not values:
        return Verdict(0.0, None, "no number found")
    if read.several:
        return Verdict(0.0, ", ".join(map(_canonical, values)), "several answers")
    if values[0] == gold:
        return Verdict(1.0, _canonical(values[0]), "correct")
    return Verdict(0.0, _canonical(values[0]), "wrong answer")
