"""Group advantages, reward scaling and per-turn reward-to-go, by hand."""

import pytest
import torch

from rlvr.trainer.algorithm.advantages import (
    SCALES,
    episode_returns,
    group_advantages,
    reward_to_go,
    turn_advantages,
    zero_spread_fraction,
)

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
