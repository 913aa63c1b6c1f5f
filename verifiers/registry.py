"""Verifiers by name, each with the input field it reads and a batch entry point.

``scripts/verify.py`` and the environments look verifiers up here. Every entry scores a
whole list at once, because throughput comes from batching: gsm8k and format run
in-process (pure regex, tens of thousands per second), math goes to the killable
worker pool in chunks, code fans out sandboxed subprocesses from a thread pool.
Modules are imported on first use so that `verify.py --verifier gsm8k` never pays for
importing sympy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlvr.verifiers.types import Verdict

BatchFn = Callable[[Sequence[str], Sequence[Any], float, "int | None"], list[Verdict]]


@dataclass(frozen=True)
class VerifierSpec:
    """How to run one verifier over many items."""

    name: str
    reference_field: str | None
    """The JSONL field holding the reference (``answer``, ``tests``), or None (format)."""
    batch: BatchFn
    """``(completions, references, timeout, workers) -> verdicts``, in input order."""


def _gsm8k(completions: Sequence[str], refs: Sequence[Any], timeout: float, workers: int | None) -> list[Verdict]:
    verify = importlib.import_module("rlvr.verifiers.gsm8k").verify_gsm8k
    return [verify(c, r) for c, r in zip(completions, refs)]


def _format(completions: Sequence[str], refs: Sequence[Any], timeout: float, workers: int | None) -> list[Verdict]:
    verify = importlib.import_module("rlvr.verifiers.format").verify_format
    return [verify(c) for c in completions]


def _math(completions: Sequence[str], refs: Sequence[Any], timeout: float, workers: int | None) -> list[Verdict]:
    batch = importlib.import_module("rlvr.verifiers.math").verify_math_batch
    return batch(completions, [str(r) for r in refs], timeout=timeout, workers=workers)


def _code(completions: Sequence[str], refs: Sequence[Any], timeout: float, workers: int | None) -> list[Verdict]:
    batch = importlib.import_module("rlvr.verifiers.code").verify_code_batch
    return batch(completions, refs, timeout=timeout, workers=workers)


VERIFIERS: dict[str, VerifierSpec] = {
    "gsm8k": VerifierSpec("gsm8k", "answer", _gsm8k),
    "math": VerifierSpec("math", "answer", _math),
    "format": VerifierSpec("format", None, _format),
    "code": VerifierSpec("code", "tests", _code),
}

DEFAULT_TIMEOUTS = {"gsm8k": 1.0, "format": 1.0, "math": 5.0, "code": 10.0}
"""Per-item wall-clock bound in seconds when the caller gives none."""


def get_verifier(name: str) -> VerifierSpec:
    """Return the spec for ``name``, or raise naming the known verifiers."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise KeyError(f"unknown verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}") from None
