r"""Code verifier: run the completion's Python program against tests in a sandbox.

The program is the completion's last fenced block tagged ``python`` (or ``py``,
``python3``) or untagged; a completion with no fence at all is taken whole. Tests come in
two forms, chosen by type:

- assert strings (HumanEval style): each string is a block of code, e.g. HumanEval's
  ``def check(candidate): ...`` text followed by ``check(entry_point)``. The tests run in
  one namespace of a trusted evaluator process, never in the program's interpreter; the
  program's top-level functions and classes are proxies there, and what they return is
  rebuilt as plain data (exact built-in types). A result of any other type (a subclass of
  int, an object with its own ``__eq__``) fails the test with a reason that says so;
  mutated list/dict/set arguments are sent back after the call. ``sandbox_evaluator.py``
  says exactly what a test may and may not do. ``__name__`` is not ``"__main__"`` for the
  program, so demo code behind a main guard does not run; a test passes when it raises
  nothing.
- ``{"input": str, "output": str}`` pairs: the program runs as ``__main__`` once per pair
  with that stdin; it passes when it exits with status 0 and its stdout equals the
  expected output, ignoring trailing ASCII whitespace on each line and trailing blank
  lines (lines end at "\n" only: a Unicode line separator is not a newline). The
  comparison happens here, outside the sandbox; the expected output never enters it.

Score 1.0 only when every test passes (reason "passed"); otherwise 0.0 with one reason:
"no code found", "syntax error", "runtime error" (the program itself raised before any
test), "tests failed: F/N" (F of N tests failed), "timeout", "memory limit",
"output limit", "exited early" (the program's process ended with status 0 before all
tests were run, e.g. ``os._exit(0)``), "crashed" (killed by a signal, a nonzero exit, or
a program that broke its call channel),
"invalid harness output" (lines on the result channel without the run's nonce),
"sandbox error" (the sandbox failed to start twice in a row; not the program's doing).
"memory limit" also covers the kernel killing a process of the run for the run's memory
cap (its cgroup, see ``sandbox_cgroup.py``).

Why pass/fail never comes from the exit code or stdout: a program can ``sys.exit(0)``,
``os._exit(0)`` or print "passed". The evaluator writes nonce-stamped records to a
private pipe that the program's process never holds, and the verdict needs a record for
every test plus a final ``done`` record; see ``sandbox.py`` for what that does and does
not defend against.

``timeout`` bounds the whole run (all tests together), not each test.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlvr.verifiers.sandbox import SandboxError, SandboxLimits, SandboxRun, run_in_sandbox
from rlvr.verifiers.types import Verdict

PYTHON_FENCE_TAGS = ("", "python", "py", "python3")
_EXIT_MEMORY = 86  # exit status the harness's io child uses for an uncaught MemoryError
_SNIPPET = 80  # characters of expected/actual output quoted in a failure message
_STDERR_TAIL = 2000
_CANDIDATE_REASONS = ("exited early", "crashed")  # the evaluator saw the candidate process end


@dataclass(frozen=True)
class CodeResult:
    """Per-test outcome of running one program, for scores and multi-turn feedback."""

    passed: int
    """Tests that passed."""
    total: int
    """Tests given."""
    failures: list[str] = field(default_factory=list)
    """Short messages, e.g. "test 2: AssertionError at line 3: assert f(1) == 2"."""
    reason: str = ""
    """The verdict reason (see the module docstring); "passed" iff every test passed."""
    stderr: str = ""
    """The last characters of the program's stderr (decoded, capped)."""
    elapsed: float = 0.0
    """Wall seconds spent in the sandbox."""
    isolation: str = ""
    """Isolation level the run used (``sandbox.isolation_level()``)."""


def extract_program(completion: str) -> str | None:
    """Return the last fenced Python (or untagged) block; the whole text if unfenced.

    An unclosed final fence (a completion cut off at the token limit) still counts: the
    text after it is the block. Returns None when nothing non-blank is found.
    """
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    saw_fence = False
    for line in completion.splitlines():
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            saw_fence = True
            current = []
            blocks.append((stripped[3:].strip().lower(), current))
        elif current is not None and stripped.startswith("```"):
            current = None
        elif current is not None:
            current.append(line)
    if not saw_fence:
        return completion if completion.strip() else None
    for tag, lines in reversed(blocks):
        if tag in PYTHON_FENCE_TAGS and "".join(lines).strip():
            return "\n".join(lines) + "\n"
    return None


def _split_tests(tests: Any) -> tuple[str, list[str], list[str] | None]:
    """Return (mode, what goes into the sandbox, expected outputs or None)."""
    if isinstance(tests, (str, Mapping)):
        tests = [tests]  # one assert block, or one stdin/stdout pair
    if not isinstance(tests, Sequence) or len(tests) == 0:
        raise ValueError(f"tests must be a non-empty list, got {tests!r:.100}")
    if all(isinstance(t, str) for t in tests):
        return "asserts", list(tests), None
    if all(isinstance(t, Mapping) and {"input", "output"} <= t.keys() for t in tests):
        return "io", [str(t["input"]) for t in tests], [str(t["output"]) for t in tests]
    raise ValueError("tests must be all assert strings or all {'input', 'output'} dicts")


_ASCII_SPACE = " \t\r\n\x0b\x0c"


def normalize_output(text: str) -> str:
    r"""Drop trailing ASCII whitespace on each line and trailing blank lines.

    Lines end at "\n" only (a "\r" before it is trailing whitespace, so CRLF is a
    newline): ``str.splitlines`` would also split at U+2028, U+0085 and the like, so a
    program could print one line where several are expected.
    """
    return "\n".join(line.rstrip(_ASCII_SPACE) for line in text.split("\n")).rstrip(_ASCII_SPACE)


def _quote(text: str) -> str:
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


def _assert_outcome(run: SandboxRun, total: int) -> tuple[int, list[str], str | None]:
    """Return (passed, failures, reason or None when the tests decide it)."""
    program = run.of_kind("program")
    if program and not program[0].get("ok"):
        reason = "memory limit" if program[0].get("memory") else "runtime error"
        if program[0].get("reason") in _CANDIDATE_REASONS:  # the process ended, no exception
            return 0, [f"program: {program[0].get('error')}"], program[0]["reason"]
        return 0, [f"program raised {program[0].get('error')}"], reason
    results = {r.get("index"): r for r in run.of_kind("test")}
    failures, passed, memory, gone = [], 0, False, None
    for index in range(total):
        record = results.get(index)
        if record is None:
            failures.append(f"test {index}: did not finish")
        elif record.get("ok") is True:
            passed += 1
        else:
            failures.append(f"test {index}: {record.get('error')}")
            memory |= bool(record.get("memory"))
            if record.get("reason") in _CANDIDATE_REASONS:
                gone = gone or record["reason"]
    return passed, failures, "memory limit" if memory else gone


def _io_outcome(run: SandboxRun, expected: list[str]) -> tuple[int, list[str], str | None]:
    results = {r.get("index"): r for r in run.of_kind("io")}
    failures, passed = [], 0
    reason = None
    for index, want in enumerate(expected):
        record = results.get(index)
        if record is None:
            failures.append(f"test {index}: did not finish")
            continue
        if record.get("overflow"):
            reason = "output limit"
        exit_code = record.get("exit")
        stdout = record.get("stdout")
        got = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else ""
        if exit_code != 0:
            if exit_code == _EXIT_MEMORY:
                reason = reason or "memory limit"
            failures.append(f"test {index}: exit status {exit_code}")
        elif normalize_output(got) != normalize_output(want):
            failures.append(f"test {index}: wrong output: expected {_quote(want.strip())}, got {_quote(got.strip())}")
        else:
            passed += 1
    return passed, failures, reason


def _reason(run: SandboxRun, passed: int, total: int, specific: str | None) -> str:
    """One reason, most telling first: a broken channel or a limit beats a test count."""
    if not run.valid:
        return "invalid harness output"
    if run.output_overflow:
        return "output limit"
    if run.memory_exceeded and not (passed == total and specific is None):
        return "memory limit"  # the kernel killed a process of the run for its memory cap
    if specific in ("syntax error", "runtime error"):
        return specific
    finished = bool(run.of_kind("done"))
    if finished and passed == total and specific is None:
        return "passed"
    if run.timed_out:
        return "timeout"
    if specific is not None:
        return specific
    if not finished:
        return "exited early" if run.returncode == 0 else "crashed"
    return f"tests failed: {total - passed}/{total}"


def run_tests(
    program: str,
    tests: Sequence[str] | Sequence[dict],
    *,
    timeout: float = 10.0,
    limits: SandboxLimits | None = None,
    isolation: str | None = None,
) -> CodeResult:
    """Run ``program`` in the sandbox against ``tests``; see the module docstring.

    ``limits`` overrides the sandbox caps (its ``timeout`` is replaced by ``timeout``);
    ``isolation`` forces a sandbox level (see ``sandbox.run_in_sandbox``).
    Raises ValueError for malformed ``tests`` (a reference problem, not a model one).
    """
    mode, sandbox_tests, expected = _split_tests(tests)
    limits = dataclasses.replace(limits or SandboxLimits(), timeout=timeout)
    total = len(sandbox_tests)
    try:
        run = run_in_sandbox(program, sandbox_tests, mode=mode, limits=limits, isolation=isolation)
    except SandboxError as exc:  # twice in a row: a verdict, never a crash of the batch
        return CodeResult(
            passed=0, total=total, failures=[f"sandbox error: {exc}"], reason="sandbox error", isolation=isolation or ""
        )
    syntax = run.of_kind("syntax")
    if syntax:
        passed, failures, specific = 0, [f"syntax error: {syntax[0].get('error')}"], "syntax error"
    elif expected is None:
        passed, failures, specific = _assert_outcome(run, total)
    else:
        passed, failures, specific = _io_outcome(run, expected)
    reason = _reason(run, passed, total, specific)
    if reason in ("invalid harness output", "output limit", "timeout", "exited early", "crashed"):
        failures = [reason, *failures]  # say why the per-test list is incomplete
    if reason == "invalid harness output":
        passed = 0  # records are not trustworthy
    stderr = run.stderr[-_STDERR_TAIL:].decode("utf-8", "replace")
    return CodeResult(
        passed=passed,
        total=total,
        failures=failures,
        reason=reason,
        stderr=stderr,
        elapsed=run.elapsed,
        isolation=run.isolation,
    )


def verify_code(completion: str, tests: Sequence[str] | Sequence[dict], *, timeout: float = 10.0) -> Verdict:
    """Score 1.0 iff the completion's program passes every test; ``parsed`` is the program."""
    program = extract_program(completion)
    if program is None:
        _split_tests(tests)  # malformed tests raise even when there is no code
        return Verdict(0.0, None, "no code found")
    result = run_tests(program, tests, timeout=timeout)
    return Verdict(1.0 if result.reason == "passed" else 0.0, program, result.reason)


def default_workers() -> int:
    """Threads for :func:`verify_code_batch`: each mostly waits on its sandbox process."""
    return 4 * (os.cpu_count() or 1)


def verify_code_batch(
    completions: Sequence[str], tests_list: Sequence[Any], *, timeout: float = 10.0, workers: int | None = None
) -> list[Verdict]:
    """:func:`verify_code` over pairs, run from a thread pool; results in input order."""
    if len(completions) != len(tests_list):
        raise ValueError(f"{len(completions)} completions but {len(tests_list)} test lists")
    if not completions:
        return []
    workers = max(1, min(workers or default_workers(), len(completions)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify-code") as pool:
        return list(pool.map(lambda ct: verify_code(ct[0], ct[1], timeout=timeout), zip(completions, tests_list)))
