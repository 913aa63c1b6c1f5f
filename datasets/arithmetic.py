"""Procedural arithmetic problems: infinite, deterministic per (seed, index).

This is the task the learning tests train on: a tiny model can learn it, and its
difficulty is a dial (digits per operand, operators, number of operands). Each problem
is drawn from ``random.Random(f"{seed}:{index}")``, so problem ``i`` of seed ``s`` is the
same on every machine and in every process, independent of how many were drawn before
(string seeds hash with SHA-512 in CPython, unlike ``hash()`` of a str).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem: ``expression`` such as ``"12+7"`` and its exact integer ``answer``."""

    index: int
    expression: str
    answer: int

    @property
    def task_id(self) -> str:
        return f"arithmetic-{self.index}"


@dataclass(frozen=True)
class ArithmeticConfig:
    """The difficulty dial."""

    digits: int = 1
    """Maximum digits per operand (operands are drawn uniformly from 0 .. 10**digits - 1)."""
    operators: str = "+-"
    """Operators to draw from, a subset of ``+-*``."""
    num_operands: int = 2
    """How many operands each expression has (>= 2)."""

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")
        if self.num_operands < 2:
            raise ValueError(f"num_operands must be >= 2, got {self.num_operands}")


def make_problem(seed: int, index: int, config: ArithmeticConfig = ArithmeticConfig()) -> ArithmeticProblem:
    """Return problem ``index`` of the stream named by ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    hi = 10**config.digits - 1
    operands = [rng.randint(0, hi) for _ in range(config.num_operands)]
    ops = [rng.choice(config.operators) for _ in range(config.num_operands - 1)]
    expression = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:]))
    # Evaluated with integer arithmetic and the usual precedence; the expression holds only
    # digits and + - *, which we generated ourselves.
    answer = _evaluate(operands, ops)
    return ArithmeticProblem(index=index, expression=expression, answer=answer)


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Evaluate with * binding tighter than + and -, without eval()."""
    terms: list[int] = [operands[0]]
    signs: list[int] = [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def iter_problems(
    seed: int = 0, config: ArithmeticConfig = ArithmeticConfig(), start: int = 0
) -> Iterator[ArithmeticProblem]:
    """Yield problems ``start, start+1, ...`` forever."""
    index = start
    while True:
        yield make_problem(seed, index, config)
        index += 1
