"""Dynamic sampling: groups whose rewards have no spread leave the batch, and more tasks are played.

DAPO (Yu et al. 2025, arXiv:2503.14476, section 3.2, "Dynamic Sampling": "over-sample and
filter out prompts with the accuracy equal to 1 and 0"). A group of G episodes with returns R_1..R_G
has advantages ``A_i = (R_i - b) / s`` with ``b`` the group's mean (or, RLOO, the mean of
the others), so when

    spread(R) = max_i R_i - min_i R_i <= atol        (atol = 1e-8)

every advantage is 0, the group's policy gradient is 0, and it only dilutes the batch
(token-mean losses divide by its tokens too) and pays for its learner forward passes.

The rule, per player (the synchronous loop's, the pipeline's generator process, each Ray
generator actor on its own shard: each fills its own quota independently):

1. round 0 plays the step's scheduled groups (``step.TaskSchedule``), as without the rule;
2. while fewer than ``quota`` (= the groups it plays per step) informative groups are in
   hand and fewer than ``max_sampling_rounds`` extra rounds were played, it plays another
   round of ``quota`` groups, on tasks and with a sampling seed that are functions of
   ``(seed, step, round, first group of the shard)`` only (``extra_tasks``, ``round_seed``);
3. it keeps the first ``quota`` informative groups in play order (round 0 first); surplus
   informative groups are dropped, so the batch size is kept;
4. **a step still short** learns from the informative groups it has (fewer episodes; its
   record says ``dynamic/groups_short`` and a warning is logged);
5. **no informative group at all** after the bound: the player returns its round-0 groups
   (all zero-spread), and the learner learns from them: its policy-gradient term is zero
   (the KL and entropy terms, if on, still act), and the step is taken, so that the weight
   versions of the pipelines stay in lockstep with the steps; the record says
   ``dynamic/no_informative = 1``.

On the learner side (``learned_batch``) the one rule is "the informative groups of the
batch, or all of it when none is informative": one player's batch is already so; with
several Ray shards it drops the zero-spread fallback of a shard that found nothing when
another shard did find informative groups.

Reproducibility: the extra tasks and seeds depend on nothing sampled (which groups were
informative decides only *whether* round ``r`` is played; the tasks a finite dataset avoids
are those of the step's earlier rounds, themselves such functions), so ``--max-staleness 0``
equals the synchronous loop and a resumed run equals an uninterrupted one.

Departures from the paper: DAPO samples until the batch is full, without bound; here the
bound ``max_sampling_rounds`` keeps a step's cost finite on a task the policy always or
never solves. DAPO filters on accuracy (all right or all wrong); here on the spread of the
returns, which is the same for a 0/1 verifier and, with shaped rewards (format
components, ``overlong``), keeps a group whose returns differ, since it has an advantage.

    python scripts/train.py --env arithmetic --dynamic-sampling --max-sampling-rounds 3
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from rlvr.trainer.algorithm.advantages import SPREAD_ATOL
from rlvr.trainer.algorithm.rollout import Episode, Played, RolloutBatch, TaskRef

EXTRA_INDEX_STRIDE = 2**40
"""Round ``r`` of a procedural env plays task ``r * stride + cursor`` (round 0: the schedule's ``cursor``).

The schedule's cursor would reach it after 2**40 groups (ten thousand groups a second for
three years): extra tasks never repeat the schedule's, nor another round's.
"""

ROUND_SEED_STRIDE = 15_485_863
"""Sampling-seed offset per extra round (the millionth prime; apart from the shard's 104729, the turn's 7919)."""

Group = list[Episode]


def has_spread(returns: Sequence[float], atol: float = SPREAD_ATOL) -> bool:
    """Return whether a group's returns differ (``max - min > atol``): only then it has an advantage."""
    return max(returns) - min(returns) > atol


def informative(groups: Sequence[Group]) -> list[Group]:
    """Return the groups whose episode returns (``Episode.reward``) have spread, in order."""
    return [g for g in groups if has_spread([e.reward for e in g])]


def round_seed(seed: int, round_: int) -> int:
    """Return the sampling seed of extra round ``round_`` from the round-0 seed ``seed`` (round 0: ``seed``)."""
    return seed + ROUND_SEED_STRIDE * round_


def extra_tasks(
    seed: int,
    step: int,
    round_: int,
    first_group: int,
    count: int,
    prompts_per_step: int,
    num_tasks: int | None,
    exclude: frozenset[int] = frozenset(),
) -> list[TaskRef]:
    """Return the ``count`` tasks of extra round ``round_ >= 1`` of ``step``, for the shard from ``first_group``.

    A function of its arguments only. The reset seed of slot ``p`` is ``seed + round_ *
    EXTRA_INDEX_STRIDE + cursor`` with ``cursor = (step - 1) * prompts_per_step + p`` the
    schedule's cursor of that slot (round 0's rule, shifted). Procedural envs (``num_tasks``
    None) play task ``round_ * EXTRA_INDEX_STRIDE + cursor``: fresh tasks, never the
    schedule's. Finite datasets draw ``count`` distinct tasks with ``random.Random`` keyed on
    ``(seed, step, round_, first_group)``, avoiding ``exclude`` (the tasks this player already
    played in the step) while enough others remain, and with replacement only from a dataset
    smaller than ``count``.
    """
    if round_ < 1:
        raise ValueError(f"extra rounds are numbered from 1, got {round_}")
    cursors = [(step - 1) * prompts_per_step + first_group + i for i in range(count)]
    seeds = [seed + round_ * EXTRA_INDEX_STRIDE + c for c in cursors]
    if num_tasks is None:
        return [TaskRef(index=round_ * EXTRA_INDEX_STRIDE + c, seed=s) for c, s in zip(cursors, seeds)]
    rng = random.Random(f"{seed}:{step}:{round_}:{first_group}")
    pool = [i for i in range(num_tasks) if i not in exclude]
    if len(pool) < count:
        pool = list(range(num_tasks))
    picks = rng.sample(pool, count) if count <= len(pool) else [rng.choice(pool) for _ in range(count)]
    return [TaskRef(index=i, seed=s) for i, s in zip(picks, seeds)]


def fill_batch(
    first: RolloutBatch,
    first_tasks: Sequence[TaskRef],
    max_rounds: int,
    tasks_of: Callable[[int, frozenset[int]], list[TaskRef]],
    play: Callable[[int, list[TaskRef]], RolloutBatch],
) -> RolloutBatch:
    """Play extra rounds after ``first`` until it holds ``len(first.groups)`` informative groups, or the bound.

    ``tasks_of(r, played)``: the tasks of extra round ``r`` (``played``: task indices already
    played in the step); ``play(r, tasks)``: play them with round ``r``'s seed. Returns the
    first ``quota`` informative groups in play order (or, when there is none, ``first``'s
    groups), renumbered ``Episode.group = 0, 1, ...``, the seconds of every round, and the
    ``Played`` accounting. See the module docstring for the rule.
    """
    quota = len(first.groups)
    rounds, kept = [first], informative(first.groups)
    played = frozenset(t.index for t in first_tasks)
    while len(kept) < quota and len(rounds) <= max_rounds:
        tasks = tasks_of(len(rounds), played)
        played |= {t.index for t in tasks}
        batch = play(len(rounds), tasks)
        rounds.append(batch)
        kept += informative(batch.groups)
    groups = kept[:quota] if kept else first.groups
    for g, group in enumerate(groups):
        for episode in group:
            episode.group = g
    every = [g for batch in rounds for g in batch.groups]
    accounting = Played(
        groups=len(every),
        zero_spread=len(every) - sum(len(informative(b.groups)) for b in rounds),
        rounds=len(rounds) - 1,
        quota=quota,
        reward_sum=sum(e.reward for g in every for e in g),
        episodes=sum(len(g) for g in every),
        tokens=sum(e.num_model_tokens for g in every for e in g),
    )
    return RolloutBatch(
        groups=groups,
        generation_seconds=sum(b.generation_seconds for b in rounds),
        env_seconds=sum(b.env_seconds for b in rounds),
        played=accounting,
    )


def learned_batch(rollouts: RolloutBatch) -> tuple[RolloutBatch, int]:
    """Return the groups the learner learns from and how many are informative.

    The informative groups of ``rollouts``, or all of them when none is (then every
    group is zero-spread and the step's policy gradient is zero; see the module docstring).
    """
    kept = informative(rollouts.groups)
    return dataclasses.replace(rollouts, groups=kept or rollouts.groups), len(kept)
