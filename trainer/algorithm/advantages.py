"""Group-relative advantages: the baseline of GRPO, with no value network.

For one prompt and its group of G episodes with returns R_1..R_G (an episode's return is
the undiscounted sum of its per-turn rewards):

    A_i = (R_i - mean_j R_j) / (s + eps)

The scale ``s`` is picked once at setup from ``SCALES`` (``eps = 1e-4`` guards the std
against zero; with ``"none"`` the divisor is exactly 1):

- ``"group"``: the standard deviation of the group's returns (GRPO, Shao et al. 2024);
- ``"batch"``: the standard deviation of all returns in the batch, with the mean still
  taken per group ("group mean, batch std", Liu et al. 2025 "Tricks or Traps");
- ``"none"``: ``s = 1``, no division (Dr. GRPO, Liu et al. 2025, which argues the
  per-group std up-weights groups that are almost all right or almost all wrong).

Multi-turn episodes: the tokens of turn t get the advantage of their *reward-to-go*
``G_{i,t} = sum_{k >= t} r_{i,k}`` against the same group baseline,
``A_{i,t} = (G_{i,t} - mean_j R_j) / (s + eps)``, so a turn is not credited with rewards
that came before it. When an environment rewards only the final step (every single-turn
environment, and most multi-turn ones) ``G_{i,t} = R_i`` for every turn and this is
exactly the GRPO advantage above.

Departure from the paper: the standard deviation is the population one
(``unbiased=False``), so a group of two with rewards {0, 1} gets advantages of +-1.

**Estimators** (``ESTIMATORS``, ``TrainConfig.advantage_estimator``): the same form
``A_{i,t} = (G_{i,t} - b_i) / s``, with the baseline ``b`` and the divisor ``s`` chosen
together:

- ``"grpo"``: ``b_i = mean_j R_j`` over the group, ``s`` from ``SCALES`` as above.
- ``"rloo"`` (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024 "Back to
  Basics"): ``b_i = 1/(G-1) sum_{j != i} R_j``, the mean of the *other* episodes of the
  group, so the baseline does not depend on the episode it judges (unbiased); ``s = 1``.
  Equal to ``G/(G-1)`` times the centred return.
- ``"reinforce++-baseline"`` (Hu et al. 2025, "REINFORCE++", its ``-baseline`` variant for
  RLVR): ``b_i = mean_j R_j`` over the group, then the centred returns are normalised over
  the whole batch, ``s = std_batch(R - mean_group R) + eps``. Departure: the batch std is
  taken over episodes (each weighs the same), where OpenRLHF and verl whiten over tokens
  (long completions weigh more); with single-turn rewards the centred returns have batch
  mean 0 already, so only the divisor differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

ScaleFn = Callable[[torch.Tensor, float], torch.Tensor]
"""Maps returns ``[num_groups, group_size]`` and ``eps`` to the divisor, broadcastable to them."""


def group_std(returns: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide by ``std(group) + eps``: ``[num_groups, 1]``."""
    return returns.std(dim=1, unbiased=False, keepdim=True) + eps


def batch_std(returns: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide by ``std(batch) + eps``: ``[]``."""
    return returns.std(unbiased=False) + eps


def unit_scale(returns: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide by 1 (no eps needed): centre only (Dr. GRPO)."""
    return torch.ones((), dtype=returns.dtype)


def centred_batch_std(returns: torch.Tensor, eps: float) -> torch.Tensor:
    """Divide by ``std(batch of group-centred returns) + eps``: ``[]`` (REINFORCE++-baseline)."""
    return (returns - returns.mean(dim=1, keepdim=True)).std(unbiased=False) + eps


SCALES: dict[str, ScaleFn] = {"group": group_std, "batch": batch_std, "none": unit_scale}
"""Reward scaling by name; ``TrainConfig.scale`` picks one of these once."""

BaselineFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps returns ``[num_groups, group_size]`` to each episode's baseline, the same shape."""


def group_mean(returns: torch.Tensor) -> torch.Tensor:
    """``b_i = mean_j R_j`` over the group (GRPO, REINFORCE++-baseline)."""
    return returns.mean(dim=1, keepdim=True).expand_as(returns)


def leave_one_out_mean(returns: torch.Tensor) -> torch.Tensor:
    """``b_i = (sum_j R_j - R_i) / (G - 1)``: the mean of the other episodes (RLOO)."""
    size = returns.shape[1]
    if size < 2:
        raise ValueError("a leave-one-out baseline needs groups of at least 2 episodes")
    return (returns.sum(dim=1, keepdim=True) - returns) / (size - 1)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: the baseline and the divisor, chosen together once at setup."""

    baseline: BaselineFn
    scale: ScaleFn


ESTIMATORS = ("grpo", "rloo", "reinforce++-baseline")
"""Advantage estimators by name (``--advantage-estimator``); see the module docstring."""


def make_estimator(name: str, scale: str = "group") -> Estimator:
    """Return the estimator ``name``; ``scale`` (a key of ``SCALES``) is GRPO's divisor, the others fix their own."""
    if name == "grpo":
        return Estimator(group_mean, SCALES[scale])
    if name == "rloo":
        return Estimator(leave_one_out_mean, unit_scale)
    if name == "reinforce++-baseline":
        return Estimator(group_mean, centred_batch_std)
    raise ValueError(f"unknown advantage estimator {name!r}; choose one of {list(ESTIMATORS)}")


def group_advantages(returns: torch.Tensor, scale: ScaleFn, eps: float = 1e-4) -> torch.Tensor:
    """Return ``A = (R - mean_group(R)) / scale(R, eps)`` for returns ``[num_groups, group_size]``.

    The advantages have the same shape. A group whose returns are all equal gets zero
    advantages (and so contributes no policy gradient) under every scale.
    """
    if returns.dim() != 2:
        raise ValueError(f"returns must be [num_groups, group_size], got shape {tuple(returns.shape)}")
    return (returns - group_mean(returns)) / scale(returns, eps)


def turn_advantages(
    turn_rewards: Sequence[Sequence[Sequence[float]]], scale: ScaleFn | Estimator, eps: float = 1e-4
) -> list[list[list[float]]]:
    """Per-turn advantages from per-turn rewards, indexed ``[group][episode][turn]``.

    ``A_{i,t} = (G_{i,t} - b_i) / s_i`` with ``G_{i,t}`` the reward-to-go of episode i from
    turn t; the baseline ``b`` and the divisor ``s`` come from the episode returns
    ``R_j = G_{j,0}`` (a bare ``ScaleFn`` means GRPO's group-mean baseline). Groups must all
    have the same size; episodes may have any number of turns (at least one).
    """
    estimator = scale if isinstance(scale, Estimator) else Estimator(group_mean, scale)
    returns = episode_returns(turn_rewards)  # [num_groups, group_size]
    baseline = estimator.baseline(returns)  # [num_groups, group_size]
    divisor = estimator.scale(returns, eps).expand_as(returns)  # [num_groups, group_size]
    out: list[list[list[float]]] = []
    for g, group in enumerate(turn_rewards):
        out.append([])
        for i, rewards in enumerate(group):
            to_go = reward_to_go(rewards)
            out[-1].append([(x - baseline[g, i].item()) / divisor[g, i].item() for x in to_go])
    return out


def reward_to_go(rewards: Sequence[float]) -> list[float]:
    """``G_t = sum_{k >= t} r_k``: ``[1, 2, 3] -> [6, 5, 3]``."""
    out, acc = [], 0.0
    for r in reversed(rewards):
        acc += float(r)
        out.append(acc)
    return out[::-1]


def episode_returns(turn_rewards: Sequence[Sequence[Sequence[float]]]) -> torch.Tensor:
    """Sum of each episode's turn rewards: ``[num_groups, group_size]`` float64."""
    sizes = {len(group) for group in turn_rewards}
    if len(sizes) != 1:
        raise ValueError(f"every group must have the same size, got sizes {sorted(sizes)}")
    if any(len(rewards) == 0 for group in turn_rewards for rewards in group):
        raise ValueError("every episode needs at least one turn reward")
    return torch.tensor(
        [[sum(float(r) for r in rewards) for rewards in group] for group in turn_rewards],
        dtype=torch.float64,
    )


SPREAD_ATOL = 1e-8
"""Returns of a group closer than this are equal: the group has no spread, hence no advantage
(``zero_spread_fraction`` here, dynamic sampling's ``has_spread``)."""


def zero_spread_fraction(returns: torch.Tensor, atol: float = SPREAD_ATOL) -> float:
    """Fraction of groups (rows of ``[num_groups, group_size]``) whose returns are all equal.

    Such groups have zero advantage everywhere and teach nothing; a fraction near 1 means
    the task is too easy or too hard for the current policy.
    """
    spread = returns.max(dim=1).values - returns.min(dim=1).values  # [num_groups]
    return float((spread <= atol).float().mean())
