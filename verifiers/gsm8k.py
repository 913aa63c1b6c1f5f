"""GSM8K-style numeric answers: the number after the last ``####``, else the last number.

The reference is a GSM8K solution (``... #### 18``), a plain number string, or an int or
float. The completion's answer is the first number after its last ``####`` when it has
one (the GSM8K convention), otherwise the last number in its text. Both sides are read
as exact rationals (:class:`fractions.Fraction` from the decimal string, never a float),
so ``12345678901234567890`` and ``12345678901234567891`` differ and ``18`` equals
``18.00``.

What a number may look like: a sign (``-``, ``+``, or the Unicode minus), a currency
sign (``$``, ``€``, ``£``) before or after the sign, thousands separators (``1,234,567``:
groups of three only, so a list like ``1,2,3`` reads as three numbers), a decimal part,
or a simple fraction of integers ``3/4``. A trailing ``%`` or unit is ignored. A number glued to a
word (``x2``, ``abc123``) is not read.

Bounded work on hostile input: the fallback scans only the last ``_TAIL_CHARS``
characters, the ``####`` branch only the ``_TAIL_CHARS`` after the marker, numbers are
at most ``_MAX_DIGITS`` digits, and the regex has no nested quantifiers, so a
100,000-character completion costs microseconds. Parsed references are cached.

Departure from common practice: lm-eval's "flexible extract" also takes the last
number, but it compares strings after stripping; here ``18.0`` equals ``18``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

from rlvr.verifiers.types import Verdict

_TAIL_CHARS = 512
_MAX_DIGITS = 64

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


def extract_number(text: str) -> Fraction | None:
    """Return the exact value of the answer in ``text``, or None.

    The answer is the first number after the last ``####``; without a ``####``, the last
    number in the final ``_TAIL_CHARS`` characters.
    """
    marker = text.rfind("####")
    if marker >= 0:
        match = _NUMBER.search(text[marker + 4 : marker + 4 + _TAIL_CHARS])
    else:
        match = _last_number(text[-_TAIL_CHARS:])
    return None if match is None else _to_fraction(match)


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
    ``"37/2"``); reasons are "correct", "wrong answer", "no number found" and, for a
    reference with no number, "bad reference".
    """
    gold = _reference_to_fraction(answer)
    if gold is None:
        return Verdict(0.0, None, "bad reference")
    if not isinstance(completion, str):
        return Verdict(0.0, None, "no number found")
    value = extract_number(completion)
    if value is None:
        return Verdict(0.0, None, "no number found")
    if value == gold:
        return Verdict(1.0, _canonical(value), "correct")
    return Verdict(0.0, _canonical(value), "wrong answer")
