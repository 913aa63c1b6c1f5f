"""Composable rewards: an environment's reward is a weighted sum of named components.

    reward = sum_i  weight_i * score_i,     score_i = component_i(completion, task).score

Each component is a verifier call (``rlvr.verifiers``) returning a ``Verdict`` in [0, 1].
The components and their weights are returned separately in ``info`` so that training
logs correctness and format compliance as two curves rather than one blended number.
The first component is the *primary* one (correctness): its ``parsed`` and ``reason``
are what ``info["parsed"]`` and ``info["reason"]`` report, and a multi-turn environment
counts a task as solved when the primary score is 1.

Scoring lives in ``rlvr.verifiers``; this module only wires verifiers to tasks and adds
them up, so no reward logic is duplicated here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlvr.verifiers.types import Verdict

FORMAT_INSTRUCTION = (
    "First think step by step inside <think> </think> tags, then give your final answer "
    "inside <answer> </answer> tags."
)
"""Appended to the system prompt when a format component is active, so the model is told
what the format reward asks for."""


@dataclass(frozen=True)
class RewardComponent:
    """One named term of the reward."""

    name: str
    """Key in ``info["reward_components"]`` and ``info["reward_weights"]``."""
    weight: float
    """Multiplier of this component's score in the total reward."""
    fn: Callable[[str, Any], Verdict]
    """``fn(completion, task) -> Verdict``; must not raise on model output."""


@dataclass(frozen=True)
class RewardResult:
    """The scored completion: total reward, each component's score and verdict."""

    reward: float
    """``sum(weights[k] * components[k])``."""
    components: dict[str, float]
    """Score in [0, 1] of each component, by name."""
    weights: dict[str, float]
    """Weight of each component, by name."""
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    """Full verdict (score, parsed, reason) of each component, by name."""
    primary: str = "correctness"
    """Name of the component whose verdict is the episode's parsed answer and reason."""

    @property
    def primary_verdict(self) -> Verdict:
        return self.verdicts[self.primary]

    @property
    def max_reward(self) -> float:
        """The reward a completion scoring 1 on every component gets."""
        return sum(w for w in self.weights.values() if w > 0)


def compose(components: Sequence[RewardComponent], completion: str, task: Any) -> RewardResult:
    """Score ``completion`` with every component and add the weighted scores up."""
    if not components:
        raise ValueError("an environment needs at least one reward component")
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ValueError(f"reward component names must be unique, got {names}")
    verdicts = {c.name: c.fn(completion, task) for c in components}
    scores = {name: float(v.score) for name, v in verdicts.items()}
    weights = {c.name: float(c.weight) for c in components}
    reward = sum(weights[k] * scores[k] for k in scores)
    return RewardResult(
        reward=float(reward),
        components=scores,
        weights=weights,
        verdicts=verdicts,
        primary=components[0].name,
    )


def format_component(weight: float, tags: tuple[str, str] = ("think", "answer")) -> RewardComponent:
    """Build the ``<think>...</think><answer>...</answer>`` shape component (``verify_format``)."""
    from rlvr.verifiers.format import verify_format

    def score_format(completion: str, task: Any) -> Verdict:
        return verify_format(completion, None, tags=tags)

    return RewardComponent(name="format", weight=weight, fn=score_format)


def wrap_in_format(reasoning: str, answer: str, tags: tuple[str, str] = ("think", "answer")) -> str:
    """Return a completion in the shape the format component rewards (for gold answers)."""
    think, ans = tags
    # The answer on lines of its own: a ```python fence must start a line to be found.
    return f"<{think}>\n{reasoning}\n</{think}>\n<{ans}>\n{answer}\n</{ans}>"
