"""The procedural arithmetic environment: infinite, deterministic, learnable by a tiny model.

Task ``i`` is ``rlvr.datasets.arithmetic.make_problem(seed, i, config)``; the difficulty
dial is ``digits`` (per operand), ``operators`` (a subset of ``+-*``) and
``num_operands``. The prompt is fixed because the default model is trained on exactly it:

    system: "Answer with the final number only."
    user:   "What is {expression}?"

The reward is ``verify_gsm8k(completion, str(answer))``: 1 when the number the completion
ends with (or writes after ``####``) equals the answer exactly.
"""

from __future__ import annotations

from rlvr.datasets.arithmetic import ArithmeticConfig, make_problem
from rlvr.envs.base import Task, TextEnv
from rlvr.verifiers.gsm8k import verify_gsm8k
from rlvr.verifiers.types import Verdict

SYSTEM_PROMPT = "Answer with the final number only."


class ArithmeticEnv(TextEnv):
    """``What is 3+4?`` -> ``7``. Infinitely many tasks (``num_tasks = None``).

    ``seed`` names the problem stream (task ``i`` is the same for every run with the same
    ``seed``); it is not the ``reset`` seed, which only chooses which task comes next.
    """

    system_prompt = SYSTEM_PROMPT
    num_tasks = None

    def __init__(
        self,
        digits: int = 1,
        operators: str = "+-",
        num_operands: int = 2,
        seed: int = 0,
        *,
        format_weight: float = 0.0,
    ) -> None:
        super().__init__(format_weight=format_weight)
        self.config = ArithmeticConfig(digits=digits, operators=operators, num_operands=num_operands)
        self.stream_seed = seed

    def get_task(self, index: int) -> Task:
        problem = make_problem(self.stream_seed, index, self.config)
        return Task(
            task_id=problem.task_id,
            prompt=f"What is {problem.expression}?",
            reference=str(problem.answer),
            metadata={"expression": problem.expression},
        )

    def verify(self, completion: str, task: Task) -> Verdict:
        return verify_gsm8k(completion, task.reference)
