"""Overlong reward shaping: DAPO's soft punishment of model turns that run into the length budget.

DAPO (Yu et al. 2025, arXiv:2503.14476, eq. 13). For a model turn of ``|y|`` tokens, with the
budget ``L_max = max_new_tokens`` and the buffer ``L_cache = overlong_buffer``:

    R_overlong(y) = 0                                          if |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache * c    if L_max - L_cache < |y| <= L_max
                  = -c                                         if |y| > L_max

with ``c = overlong_penalty`` (the paper's is 1). A turn cut at the budget has ``|y| = L_max``
(the generators count every sampled token, EOS included) and so gets ``-c`` from the second
line: the reward falls linearly from 0 to ``-c`` over the last ``L_cache`` tokens.

It is a reward component of its own, ``'overlong'``: each model turn's value is added to
that turn's reward (``Episode.turn_rewards``), so the advantages and dynamic sampling see it,
and the episode's sum over its turns is ``reward_components['overlong']``, logged as
``components/overlong_mean`` and drawn in ``reward.png`` like the verifier's components.

Departures from the paper: the paper scores the whole response once; a multi-turn episode
here is punished per model turn, each against its own budget (each turn is sampled with
``max_new_tokens``), and each turn's reward-to-go carries the punishments of its own and
later turns. ``L_cache = 0`` disables the shaping (``shape_overlong`` is then not called:
no number changes, no component appears).

    python scripts/train.py --env arithmetic --overlong-buffer 13 --overlong-penalty 1.0
"""

from __future__ import annotations

from collections.abc import Sequence

from rlvr.trainer.algorithm.rollout import Episode

COMPONENT = "overlong"
"""The reward component's name (``components/overlong_mean`` in metrics.jsonl)."""


def overlong_reward(length: int, max_tokens: int, buffer: int, penalty: float) -> float:
    """Return DAPO's eq. 13 for a turn of ``length`` tokens: 0, a linear ramp to ``-penalty``, or ``-penalty``."""
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer  # L_max - L_cache: the longest turn that is not punished
    if length <= start:
        return 0.0
    if length > max_tokens:
        return -penalty
    return (start - length) / buffer * penalty


def turn_lengths(episode: Episode) -> list[int]:
    """Return the model tokens of each turn (``loss_mask`` 1, counted by ``turn_ids``), ``[num_turns]``."""
    lengths = [0] * episode.num_turns
    for turn, mask in zip(episode.turn_ids, episode.loss_mask):
        lengths[turn] += mask
    return lengths


def shape_overlong(episodes: Sequence[Episode], max_tokens: int, buffer: int, penalty: float) -> None:
    """Add each model turn's overlong reward to its turn reward, and the episode's sum as component 'overlong'.

    In place, once per episode, before anything reads the rewards (advantages, dynamic
    sampling, metrics); ``step.Player.play`` calls it for all three loops.
    """
    for episode in episodes:
        shaped = [overlong_reward(n, max_tokens, buffer, penalty) for n in turn_lengths(episode)]
        episode.turn_rewards = [r + s for r, s in zip(episode.turn_rewards, shaped)]
        episode.reward_components[COMPONENT] = float(sum(shaped))
