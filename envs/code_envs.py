"""Code environments: the reward is 1 when the program passes every test of the problem.

- ``CodeEnv`` (single turn): the model writes a program in a ```python block; the reward
  is ``verify_code`` against the problem's tests (asserts or stdin/stdout pairs), which
  scores 1 only when all pass (no partial credit a policy could farm).
- ``CodeMultiTurnEnv``: the same, but an attempt that fails gets the failing tests back
  as the next user message (from ``rlvr.verifiers.code.run_tests``) and the model tries
  again, up to ``max_turns`` attempts. The episode terminates when every test passes
  and is truncated after ``max_turns`` attempts; the final step's reward is the score
  of the final attempt (intermediate steps return 0; see ``rlvr.envs.base``).

The program runs in the verifier's sandboxed subprocess (see ``rlvr.verifiers.code`` for
what it does and does not isolate), never in this process. A failing attempt of the
multi-turn env runs twice (once to score, once for per-test feedback); a passing one once.
"""

from __future__ import annotations

import os

from rlvr.datasets.code_problems import CodeProblem, load_code_problems
from rlvr.envs.base import Task, TextEnv
from rlvr.envs.rewards import RewardResult
from rlvr.verifiers.types import Verdict

CODE_SYSTEM_PROMPT = (
    "You are an expert Python programmer. Reply with a complete, runnable solution "
    "in a single ```python code block."
)
MAX_FAILURES_SHOWN = 5


def code_prompt(problem: CodeProblem) -> str:
    """Return the user message for a problem: the statement plus what to hand back."""
    if problem.style == "function":
        return f"{problem.prompt}\n\nDefine the function `{problem.entry_point}` in a ```python code block."
    return (
        f"{problem.prompt}\n\nWrite a program that reads standard input and writes "
        "standard output, in a ```python code block."
    )


class CodeEnv(TextEnv):
    """Programming problems scored by their tests (one attempt per episode by default).

    Kwargs: ``source`` (``"bundled"`` or a JSONL path, HumanEval files included),
    ``style`` (``"function"``, ``"stdio"`` or None for both), ``limit``, ``shuffle``,
    ``data_seed``, ``timeout`` (seconds per program run), ``max_turns`` and
    ``format_weight``.
    """

    system_prompt = CODE_SYSTEM_PROMPT

    def __init__(
        self,
        source: str | os.PathLike[str] = "bundled",
        style: str | None = None,
        limit: int | None = None,
        shuffle: bool = False,
        data_seed: int = 0,
        *,
        timeout: float = 10.0,
        max_turns: int | None = None,
        format_weight: float = 0.0,
    ) -> None:
        super().__init__(format_weight=format_weight, max_turns=max_turns)
        self.data = load_code_problems(source, style=style, shuffle=shuffle, seed=data_seed, limit=limit)  # type: ignore[arg-type]
        self.num_tasks = len(self.data)
        self.timeout = timeout

    def get_task(self, index: int) -> Task:
        p = self.data[index]
        return Task(
            task_id=p.task_id,
            prompt=code_prompt(p),
            reference=list(p.tests),
            gold=f"```python\n{p.solution}```",
            metadata={"style": p.style, "entry_point": p.entry_point},
        )

    def verify(self, completion: str, task: Task) -> Verdict:
        from rlvr.verifiers.code import verify_code

        return verify_code(completion, task.reference, timeout=self.timeout)

    def feedback(self, completion: str, result: RewardResult, task: Task) -> str:
        """Return the failing tests of the attempt, for the model's next try."""
        from rlvr.verifiers.code import run_tests

        program = result.primary_verdict.parsed
        if not program:
            return (
                "I could not find a program in your reply. Reply with the complete solution "
                "in a ```python code block."
            )
        outcome = run_tests(program, task.reference, timeout=self.timeout)
        shown = "\n".join(f"- {msg}" for msg in outcome.failures[:MAX_FAILURES_SHOWN])
        more = len(outcome.failures) - MAX_FAILURES_SHOWN
        if more > 0:
            shown += f"\n- ... and {more} more"
        if not shown:
            shown = f"- {result.primary_verdict.reason}"
        return (
            f"Your program passed {outcome.passed} of {outcome.total} tests. Failures:\n{shown}\n"
            "Fix the program and reply with the complete corrected solution in a ```python code block."
        )


class CodeMultiTurnEnv(CodeEnv):
    """``CodeEnv`` with test feedback and retries: ``max_turns`` attempts (default 3)."""

    max_turns = 3
