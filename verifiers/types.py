"""The verdict every verifier returns.

A verifier is a pure function ``(completion, reference) -> Verdict``. It never raises on
model output: anything the model wrote that cannot be scored becomes a zero verdict whose
``reason`` says why, so a training run or a 10,000-line verification file never stops
on one odd completion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Verdict:
    """The outcome of scoring one completion.

    ``score`` is in [0, 1]; ``parsed`` is what the verifier read from the completion
    (a number, a LaTeX string, the extracted program), or None when nothing was found;
    ``reason`` is a short, stable, human-readable phrase ("correct", "no boxed answer",
    "timeout", "tests failed: 2/3") that summaries count by.
    """

    score: float
    parsed: Any = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``parsed`` is stringified when it is not plain)."""
        d = asdict(self)
        if not isinstance(d["parsed"], (str, int, float, bool, type(None), list, dict)):
            d["parsed"] = str(d["parsed"])
        return d


class Verifier(Protocol):
    """Anything that scores a completion against a reference."""

    def __call__(self, completion: str, reference: Any) -> Verdict: ...
