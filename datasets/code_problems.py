"""Programming problems with tests: the bundled set, our JSONL format, and HumanEval files.

Two styles, both scored by ``rlvr.verifiers.code``:

- ``function``: write a named function; tests are Python ``assert`` strings run after the
  program (HumanEval style).
- ``stdio``: write a program; tests are ``{"input": str, "output": str}`` pairs fed to
  standard input and compared with standard output.

The bundled set (``datasets/data/code_problems.jsonl``, 34 problems, 22 function and 12
stdio) was written for this project; every reference solution passes its tests, which
``tests/test_datasets.py`` checks through the real sandboxed verifier.

Row format (JSONL): ``id``, ``style``, ``prompt``, ``tests``, ``solution`` and, for the
function style, ``entry_point``. HumanEval rows (``task_id``, ``prompt``,
``canonical_solution``, ``test``, ``entry_point``; ``.jsonl`` or ``.jsonl.gz``) are read
too: the tests become ``[test + "check(entry_point)"]`` and the reference solution is
``prompt + canonical_solution``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from rlvr.datasets.loaders import (
    DataError,
    DataSourceError,
    LoadedDataset,
    load_rows,
    require_str,
    select,
)

log = logging.getLogger(__name__)

Style = Literal["function", "stdio"]


@dataclass(frozen=True)
class CodeProblem:
    """One programming problem and its tests."""

    task_id: str
    style: Style
    prompt: str
    """The problem statement (for HumanEval: the signature and docstring in a code fence)."""
    tests: tuple[Any, ...]
    """Assert strings (function style) or ``{"input", "output"}`` dicts (stdio style)."""
    solution: str
    """A reference program that passes every test."""
    entry_point: str | None = None
    """The function to write (function style only)."""


def _parse_tests(row: dict[str, Any], style: str, path: str, number: int) -> tuple[Any, ...]:
    tests = row.get("tests")
    if tests is None:
        raise DataError(path, number, "missing field 'tests'")
    if not isinstance(tests, list) or not tests:
        raise DataError(path, number, "field 'tests' must be a non-empty list")
    for t in tests:
        ok = isinstance(t, str) if style == "function" else (
            isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str)
        )
        if not ok:
            want = "assert strings" if style == "function" else '{"input": str, "output": str} objects'
            raise DataError(path, number, f"field 'tests' of a {style} problem must hold {want}")
    return tuple(tests)


def parse_code_row(row: dict[str, Any], path: str, number: int) -> CodeProblem:
    """One row of our format or of HumanEval, as a ``CodeProblem`` (``DataError`` if malformed)."""
    if "canonical_solution" in row:  # HumanEval
        prompt = require_str(row, "prompt", path, number)
        entry = require_str(row, "entry_point", path, number)
        test = require_str(row, "test", path, number)
        return CodeProblem(
            task_id=require_str(row, "task_id", path, number),
            style="function",
            prompt=f"Complete the following Python function:\n```python\n{prompt}```",
            tests=(f"{test}\n\ncheck({entry})\n",),
            solution=prompt + require_str(row, "canonical_solution", path, number),
            entry_point=entry,
        )
    style = require_str(row, "style", path, number)
    if style not in ("function", "stdio"):
        raise DataError(path, number, f"field 'style' must be 'function' or 'stdio', got {style!r}")
    entry = require_str(row, "entry_point", path, number) if style == "function" else None
    return CodeProblem(
        task_id=require_str(row, "id", path, number),
        style=style,  # type: ignore[arg-type]
        prompt=require_str(row, "prompt", path, number),
        tests=_parse_tests(row, style, path, number),
        solution=require_str(row, "solution", path, number),
        entry_point=entry,
    )


def load_code_problems(
    source: str | os.PathLike[str] = "bundled",
    *,
    style: Style | None = None,
    shuffle: bool = False,
    seed: int = 0,
    limit: int | None = None,
) -> LoadedDataset[CodeProblem]:
    """Load code problems from ``"bundled"`` or a JSONL path; ``style`` keeps only one style."""
    if style not in (None, "function", "stdio"):
        raise ValueError(f"style must be None, 'function' or 'stdio', got {style!r}")

    def no_hub() -> Any:
        raise DataSourceError("code problems have no hub source; pass 'bundled' or a file path")

    source = "bundled" if source == "auto" else source
    label, file_label, rows = load_rows(source, "test", "code_problems.jsonl", no_hub)
    items = [parse_code_row(row, file_label, number) for number, row in rows]
    if style is not None:
        items = [p for p in items if p.style == style]
    items = select(items, shuffle=shuffle, seed=seed, limit=limit)
    log.info("code: loaded %d problems (style=%s) from %s", len(items), style or "all", label)
    return LoadedDataset(name="code", source=label, split="test", items=items)
