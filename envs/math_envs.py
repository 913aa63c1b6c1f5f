r"""GSM8K and MATH environments: one question, one answer, a verifier as the reward.

- ``GSM8KEnv``: grade-school word problems. The model is asked to end with
  ``#### <number>``; the reward is ``verify_gsm8k`` (the number on the line of the last
  ``####``, else the last number, compared exactly). Gold: the dataset's own worked
  solution.
- ``MathEnv``: competition problems with LaTeX answers. The model is asked for
  ``\boxed{...}``; the reward is ``verify_math`` (math-verify on the last box, in a
  killable worker process). Gold: ``\boxed{<reference answer>}``.

In both the last answer counts (a self-correction earns the reward) and hedging never
pays (``#### 5 or 7``, ``\boxed{5, 7}`` score 0): the rule is in each verifier's module
docstring.

Both read their rows through ``rlvr.datasets.loaders`` (hub when cached, a local file, or
the bundled sample), so ``make_env("gsm8k", source="/data/gsm8k", split="test")`` evaluates
on a real split with no code change.
"""

from __future__ import annotations

import os

from rlvr.datasets.loaders import load_gsm8k, load_math
from rlvr.envs.base import Task, TextEnv
from rlvr.verifiers.gsm8k import verify_gsm8k
from rlvr.verifiers.types import Verdict

GSM8K_SYSTEM_PROMPT = (
    "Solve the math word problem step by step. Write the final answer on the last line as '#### <number>'."
)
MATH_SYSTEM_PROMPT = "Solve the math problem step by step. Put the final answer in \\boxed{}."


class GSM8KEnv(TextEnv):
    """GSM8K word problems; kwargs select the data (see ``rlvr.datasets.loaders.load_gsm8k``)."""

    system_prompt = GSM8K_SYSTEM_PROMPT

    def __init__(
        self,
        source: str | os.PathLike[str] = "auto",
        split: str = "train",
        limit: int | None = None,
        shuffle: bool = False,
        data_seed: int = 0,
        *,
        format_weight: float = 0.0,
    ) -> None:
        super().__init__(format_weight=format_weight)
        self.data = load_gsm8k(source, split=split, shuffle=shuffle, seed=data_seed, limit=limit)
        self.num_tasks = len(self.data)

    def get_task(self, index: int) -> Task:
        ex = self.data[index]
        return Task(task_id=ex.task_id, prompt=ex.question, reference=ex.answer, gold=ex.solution)

    def verify(self, completion: str, task: Task) -> Verdict:
        return verify_gsm8k(completion, task.reference)


class MathEnv(TextEnv):
    """MATH-style problems with boxed answers; kwargs as ``rlvr.datasets.loaders.load_math``.

    ``timeout`` bounds each math-verify call (seconds); a timeout scores 0.
    """

    system_prompt = MATH_SYSTEM_PROMPT

    def __init__(
        self,
        source: str | os.PathLike[str] = "auto",
        split: str = "train",
        limit: int | None = None,
        shuffle: bool = False,
        data_seed: int = 0,
        *,
        timeout: float = 5.0,
        format_weight: float = 0.0,
    ) -> None:
        super().__init__(format_weight=format_weight)
        self.data = load_math(source, split=split, shuffle=shuffle, seed=data_seed, limit=limit)
        self.num_tasks = len(self.data)
        self.timeout = timeout

    def get_task(self, index: int) -> Task:
        ex = self.data[index]
        return Task(
            task_id=ex.task_id,
            prompt=ex.problem,
            reference=ex.answer,
            gold=f"The final answer is $\\boxed{{{ex.answer}}}$.",
            metadata={"level": ex.level, "subject": ex.subject},
        )

    def verify(self, completion: str, task: Task) -> Verdict:
        # Imported here: math-verify is heavy and its worker pool starts on first use, so
        # an arithmetic or code run never pays for it.
        from rlvr.verifiers.math import verify_math

        return verify_math(completion, task.reference, timeout=self.timeout)
