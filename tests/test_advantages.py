"""Group advantages, reward scaling and per-turn reward-to-go, by hand."""

import pytest
import torch

from rlvr.trainer.algorithm.advantages import (
    SCALES,
    episode_returns,
    group_advantages,
    make_estimator,
    reward_to_go,
    turn_advantages,
    zero_spread_fraction,
)
from rlvr.trainer.config import ConfigError, TrainConfig

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
# group 0: mean 0.5, pop. std 0.5; group 1: mean 1.5, pop. std sqrt(0.75) = 0.866...;
# batch std over all eight rewards: mean 1.0, var (0+1+1+0+4+0+0+0)/8 = 0.75.
SCALE_CASES = {
    "group": [[1.0, -1.0, -1.0, 1.0], [1.5 / 0.75**0.5, -0.5 / 0.75**0.5, -0.5 / 0.75**0.5, -0.5 / 0.75**0.5]],
    "batch": [
        [0.5 / 0.75**0.5, -0.5 / 0.75**0.5, -0.5 / 0.75**0.5, 0.5 / 0.75**0.5],
        [1.5 / 0.75**0.5, -0.5 / 0.75**0.5, -0.5 / 0.75**0.5, -0.5 / 0.75**0.5],
    ],
    "none": [[0.5, -0.5, -0.5, 0.5], [1.5, -0.5, -0.5, -0.5]],
}


@pytest.mark.parametrize("scale", SCALE_CASES, ids=list(SCALE_CASES))
def test_group_advantages_by_hand(scale):
    got = group_advantages(REWARDS, SCALES[scale], eps=0.0)
    torch.testing.assert_close(got, torch.tensor(SCALE_CASES[scale], dtype=torch.float64))


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_advantages_sum_to_zero_per_group(scale):
    got = group_advantages(REWARDS, SCALES[scale])
    torch.testing.assert_close(got.sum(dim=1), torch.zeros(2, dtype=torch.float64))


def test_equal_rewards_give_zero_advantage_not_nan():
    got = group_advantages(torch.full((2, 4), 0.5), SCALES["group"])
    assert torch.equal(got, torch.zeros(2, 4))


def test_zero_spread_fraction():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]])
    assert zero_spread_fraction(rewards) == 0.75


def test_reward_to_go():
    assert reward_to_go([1.0, 2.0, 3.0]) == [6.0, 5.0, 3.0]


def test_turn_advantages_equal_group_advantages_when_only_final_turn_is_rewarded():
    turn_rewards = [[[0.0, 0.0, 1.0], [0.0], [0.0, 0.0]], [[1.0], [0.0, 1.0], [0.0]]]
    got = turn_advantages(turn_rewards, SCALES["group"], eps=0.0)
    want = group_advantages(episode_returns(turn_rewards), SCALES["group"], eps=0.0)
    for g, group in enumerate(got):
        for i, per_turn in enumerate(group):
            assert per_turn == pytest.approx([want[g, i].item()] * len(turn_rewards[g][i]))


def test_turn_advantages_use_reward_to_go():
    # Episode returns 1.5 and 0.5: mean 1.0, scale "none". Episode 0 got 1.0 on turn 0 and
    # 0.5 on turn 1, so turn 1 is credited only with 0.5 - 1.0.
    got = turn_advantages([[[1.0, 0.5], [0.5]]], SCALES["none"], eps=0.0)
    assert got == [[pytest.approx([0.5, -0.5]), pytest.approx([-0.5])]]


@pytest.mark.parametrize(
    "turn_rewards, message",
    [([[[1.0]], [[1.0], [0.0]]], "same size"), ([[[1.0], []]], "at least one turn")],
    ids=["ragged-groups", "empty-episode"],
)
def test_episode_returns_rejects_bad_shapes(turn_rewards, message):
    with pytest.raises(ValueError, match=message):
        episode_returns(turn_rewards)


# --- the other estimators against plain loops written from the papers' formulas ------------


def _random_turn_rewards(seed: int, groups: int = 5, size: int = 6) -> list[list[list[float]]]:
    """Ragged multi-turn rewards (1-3 turns an episode), some groups with no spread."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for g in range(groups):
        if g == 0:  # all equal: a group that teaches nothing
            out.append([[1.0] for _ in range(size)])
            continue
        group = []
        for _ in range(size):
            turns = int(torch.randint(1, 4, (1,), generator=rng))
            group.append([float(x) for x in torch.rand(turns, generator=rng).round(decimals=2)])
        out.append(group)
    return out


def _to_go(rewards):
    return [sum(rewards[t:]) for t in range(len(rewards))]


def plain_rloo(turn_rewards):
    """Ahmadian et al. 2024: A_i = R_i - 1/(G-1) sum_{j != i} R_j; per turn, the reward-to-go."""
    out = []
    for group in turn_rewards:
        returns = [sum(r) for r in group]
        out.append([])
        for i, rewards in enumerate(group):
            others = [returns[j] for j in range(len(group)) if j != i]
            baseline = sum(others) / len(others)
            out[-1].append([x - baseline for x in _to_go(rewards)])
    return out


def plain_reinforce_pp_baseline(turn_rewards, eps=1e-4):
    """Hu et al. 2025: subtract the group mean, then divide by the batch std of what is left."""
    centred, means = [], []
    for group in turn_rewards:
        returns = [sum(r) for r in group]
        means.append(sum(returns) / len(returns))
        centred += [r - means[-1] for r in returns]
    mu = sum(centred) / len(centred)
    std = (sum((c - mu) ** 2 for c in centred) / len(centred)) ** 0.5
    return [
        [[(x - means[g]) / (std + eps) for x in _to_go(rewards)] for rewards in group]
        for g, group in enumerate(turn_rewards)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "name, plain", [("rloo", plain_rloo), ("reinforce++-baseline", plain_reinforce_pp_baseline)], ids=["rloo", "rpp"]
)
def test_estimators_equal_a_plain_loop(name, plain, seed):
    turn_rewards = _random_turn_rewards(seed)
    got = turn_advantages(turn_rewards, make_estimator(name))
    want = plain(turn_rewards)
    for g_got, g_want in zip(got, want, strict=True):
        for a_got, a_want in zip(g_got, g_want, strict=True):
            assert a_got == pytest.approx(a_want, abs=1e-9)
    assert all(a == [0.0] for a in got[0]), "a group with no spread has no advantage under any estimator"


def test_rloo_is_the_centred_return_scaled_by_g_over_g_minus_1():
    got = group_advantages(REWARDS, SCALES["none"], eps=0.0) * 4 / 3
    rloo = turn_advantages([[[r] for r in row] for row in REWARDS.tolist()], make_estimator("rloo"))
    assert [[a[0] for a in g] for g in rloo] == [pytest.approx(row) for row in got.tolist()]


def test_grpo_estimator_is_the_group_advantage():
    turn_rewards = [[[r] for r in row] for row in REWARDS.tolist()]
    for scale in SCALES:
        got = turn_advantages(turn_rewards, make_estimator("grpo", scale))
        assert got == turn_advantages(turn_rewards, SCALES[scale])


def test_unknown_estimator_and_a_scale_it_does_not_take_are_refused():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        make_estimator("ppo")
    with pytest.raises(ConfigError, match="applies to --advantage-estimator grpo only"):
        TrainConfig(advantage_estimator="rloo", scale="none")
    assert TrainConfig(advantage_estimator="reinforce++-baseline").advantage_estimator == "reinforce++-baseline"
