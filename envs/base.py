"""The base class of rlvr's text environments: a Gymnasium env whose action is text.

The contract (what the trainer relies on; any plain ``gymnasium.Env`` that keeps it works
with the trainer too, subclass or not):

- ``reset(*, seed=None, options=None) -> (observation, info)``. The observation is the
  prompt as chat messages ``[{"role": "system", ...}, {"role": "user", ...}]``;
  ``options={"index": i}`` picks task ``i``; otherwise the task is drawn from
  ``self.np_random``, so the same seed gives the same task. ``info`` holds ``task_id``,
  ``reference`` and ``index``.
- ``step(action: str) -> (observation, reward, terminated, truncated, info)``. ``info``
  adds ``reward_components``, ``reward_weights``, ``parsed``, ``reason``, ``turn``
  and ``verdicts`` (each component's verdict as a dict).
- Single-turn (``max_turns == 1``): ``terminated`` is True after the one step and the
  observation is ``[]``.
- Multi-turn (``max_turns > 1``): a step that does not solve the task returns the NEW
  messages only (feedback, as a user turn) with reward 0; the episode terminates when
  the task is solved and is truncated after ``max_turns`` steps. The reward of the final
  step is the score of the final attempt, and intermediate rewards are 0, so the
  episode's return equals its last reward whichever of the two the trainer uses.
  Intermediate ``info["reward_components"]`` still hold the attempt's real scores,
  for logging.

Where this departs from plain Gymnasium: ``step`` after the episode ended raises
(Gymnasium leaves it undefined), because a trainer that does it has a bookkeeping bug.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import gymnasium

from rlvr.envs.rewards import (
    FORMAT_INSTRUCTION,
    RewardComponent,
    RewardResult,
    compose,
    format_component,
    wrap_in_format,
)
from rlvr.envs.spaces import AnyText, ChatMessages
from rlvr.verifiers.types import Verdict

Messages = list[dict[str, str]]

# Range of task indices drawn for procedural environments (num_tasks is None).
_INFINITE_INDEX_RANGE = 2**31 - 1


@dataclass(frozen=True)
class Task:
    """One task of an environment."""

    task_id: str
    """Stable, unique id (appears in logs and in ``info["task_id"]``)."""
    prompt: str
    """The user message."""
    reference: Any
    """What the verifier compares against (a number, a LaTeX answer, a list of tests)."""
    gold: str | None = None
    """A completion that scores 1; ``None`` means ``str(reference)``."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (level, subject, source row)."""


class TextEnv(gymnasium.Env):
    """Base class: a text task whose reward comes from a verifier.

    Set these in all subclasses:

    - ``get_task(self, index: int) -> Task``: task number ``index``, deterministic.
    - ``verify(self, completion: str, task: Task) -> Verdict``: the correctness score;
      call a verifier from ``rlvr.verifiers`` (or return a ``Verdict`` yourself).
    - ``num_tasks``: the number of tasks (class attribute or set in ``__init__``), or
      ``None`` for a procedural environment with infinitely many.

    Optional: ``system_prompt`` (class attribute), ``max_turns`` and
    ``feedback(completion, result, task)`` for multi-turn environments, and
    ``reward_components()`` to add reward terms beyond correctness and format.

    The base class does seeding, task selection, chat formatting, reward composition,
    turn counting and the ``info`` dict. Keyword arguments of ``__init__``:
    ``format_weight`` (weight of the ``<think>/<answer>`` format component; 0 leaves
    it and its prompt instruction out), ``correctness_weight`` and ``max_turns``.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    system_prompt: str = ""
    num_tasks: int | None = None
    max_turns: int = 1

    def __init__(
        self,
        *,
        format_weight: float = 0.0,
        correctness_weight: float = 1.0,
        max_turns: int | None = None,
    ) -> None:
        if max_turns is not None:
            if max_turns < 1:
                raise ValueError(f"max_turns must be >= 1, got {max_turns}")
            self.max_turns = max_turns
        self.format_weight = float(format_weight)
        self.correctness_weight = float(correctness_weight)
        self.observation_space = ChatMessages()
        self.action_space = AnyText()
        self._task: Task | None = None
        self._index: int | None = None
        self._turn = 0
        self._done = True

    # ---- what subclasses provide -------------------------------------------------------

    def get_task(self, index: int) -> Task:
        """Return task ``index`` (0 <= index < num_tasks); must be deterministic."""
        raise NotImplementedError(f"{type(self).__name__} must define get_task(index)")

    def verify(self, completion: str, task: Task) -> Verdict:
        """Score ``completion`` for correctness with a verifier from ``rlvr.verifiers``."""
        raise NotImplementedError(f"{type(self).__name__} must define verify(completion, task)")

    def feedback(self, completion: str, result: RewardResult, task: Task) -> str:
        """Return the next user message of a multi-turn episode after an unsolved attempt."""
        return f"That is not correct ({result.primary_verdict.reason}). Try again."

    def reward_components(self) -> list[RewardComponent]:
        """Return the reward terms; the first is the primary (correctness) one."""
        components = [RewardComponent("correctness", self.correctness_weight, self.verify)]
        if self.format_weight:
            components.append(format_component(self.format_weight))
        return components

    def gold_completion(self, task: Task) -> str:
        """Return a completion that scores 1 on every component (for checks, not training)."""
        answer = task.gold if task.gold is not None else str(task.reference)
        if self.format_weight:
            return wrap_in_format("I work the problem out step by step.", answer)
        return answer

    # ---- the Gymnasium API -------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Messages, dict[str, Any]]:
        """Start an episode on a new task and return ``(prompt_messages, info)``.

        Args:
            seed: Seeds ``self.np_random`` (through ``super().reset``); the task drawn
                next is then a deterministic function of the seed. ``None`` keeps the
                generator's current state (a fresh random one on the first reset).
            options: ``{"index": i}`` picks task ``i`` instead of drawing one. Any other
                key raises ``ValueError``, so a typo does not silently draw a random task.

        Returns:
            observation: ``[{"role": "system", ...}, {"role": "user", ...}]`` (no system
                message when the system prompt is empty).
            info: ``{"task_id": str, "reference": Any, "index": int}``.
        """
        if "_done" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__(**kwargs)")
        super().reset(seed=seed)
        index = self._choose_index(options or {})
        task = self.get_task(index)
        self._task, self._index, self._turn, self._done = task, index, 0, False
        return self._prompt_messages(task), self._base_info()

    def step(self, action: str) -> tuple[Messages, float, bool, bool, dict[str, Any]]:
        """Score the model's text ``action`` and advance the episode by one turn.

        Returns:
            observation: ``[]`` when the episode ends; otherwise the new messages only,
                e.g. ``[{"role": "user", "content": "<feedback>"}]``.
            reward: ``sum(weights[k] * components[k])`` on the final step; 0.0 on the
                intermediate steps of a multi-turn episode (see the module docstring).
            terminated: the task was solved, or this is a single-turn environment.
            truncated: a multi-turn episode ran out of turns without solving the task.
            info: reset's keys plus ``reward_components``, ``reward_weights``,
                ``parsed``, ``reason``, ``verdicts`` and ``turn`` (1-based).

        Raises:
            RuntimeError: ``reset`` was not called, or the episode already ended.
            TypeError: ``action`` is not a ``str``.
        """
        if self._task is None or self._done:
            raise RuntimeError(
                f"{type(self).__name__}.step() called "
                + ("before reset()" if self._task is None else "after the episode ended")
                + "; call reset() to start an episode"
            )
        if not isinstance(action, str):
            raise TypeError(f"the action must be the model's text (str), got {type(action).__name__}")
        task = self._task
        self._turn += 1
        result = compose(self.reward_components(), action, task)
        solved = result.primary_verdict.score >= 1.0
        single_turn = self.max_turns == 1
        terminated = solved or single_turn
        truncated = not terminated and self._turn >= self.max_turns
        self._done = terminated or truncated
        if self._done:
            observation: Messages = []
            reward = result.reward
        else:
            observation = [{"role": "user", "content": self.feedback(action, result, task)}]
            reward = 0.0
        return observation, float(reward), terminated, truncated, self._step_info(result)

    # ---- conveniences --------------------------------------------------------------------

    @property
    def task(self) -> Task | None:
        """The current task (None before the first reset)."""
        return self._task

    def gold_action(self) -> str:
        """Return a completion for the current task that earns the maximum reward."""
        if self._task is None:
            raise RuntimeError("call reset() before gold_action()")
        return self.gold_completion(self._task)

    def validate(self, limit: int | None = None) -> list[Any]:
        """Model-free self-check: every task's gold scores 1 and garbage scores 0.

        Returns the per-task ``rlvr.envs.checker.GoldResult`` list; raises
        ``TextEnvCheckError`` naming the first task whose gold or garbage is misscored.
        """
        from rlvr.envs.checker import check_garbage, check_gold

        results = check_gold(self, limit=limit, raise_on_failure=True)
        check_garbage(self)
        return results

    # ---- internals -------------------------------------------------------------------------

    def _choose_index(self, options: dict[str, Any]) -> int:
        unknown = set(options) - {"index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; supported: ['index']")
        if "index" in options:
            index = options["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"options['index'] must be an int >= 0, got {index!r}")
            if self.num_tasks is not None and index >= self.num_tasks:
                raise ValueError(f"options['index']={index} out of range: {self.num_tasks} tasks")
            return index
        high = self.num_tasks if self.num_tasks is not None else _INFINITE_INDEX_RANGE
        if high < 1:
            raise RuntimeError(f"{type(self).__name__} has no tasks (num_tasks={high})")
        return int(self.np_random.integers(high))

    def _system_prompt(self) -> str:
        parts = [self.system_prompt] if self.system_prompt else []
        if self.format_weight:
            parts.append(FORMAT_INSTRUCTION)
        return " ".join(parts)

    def _prompt_messages(self, task: Task) -> Messages:
        system = self._system_prompt()
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": task.prompt})
        return messages

    def _base_info(self) -> dict[str, Any]:
        assert self._task is not None
        # Deep copies: Gymnasium requires that no two returned infos share a mutable object.
        return {
            "task_id": self._task.task_id,
            "reference": copy.deepcopy(self._task.reference),
            "index": self._index,
        }

    def _step_info(self, result: RewardResult) -> dict[str, Any]:
        primary = result.primary_verdict
        info = self._base_info()
        info.update(
            reward_components=dict(result.components),
            reward_weights=dict(result.weights),
            parsed=copy.deepcopy(primary.parsed),
            reason=primary.reason,
            verdicts={name: v.to_dict() for name, v in result.verdicts.items()},
            turn=self._turn,
        )
        return info
