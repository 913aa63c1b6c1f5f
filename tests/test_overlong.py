"""DAPO's overlong reward shaping: eq. 13 at its boundaries, per model turn, and its component in the record."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from rlvr.trainer.algorithm.overlong import overlong_reward, shape_overlong, turn_lengths
from rlvr.trainer.algorithm.rollout import Episode
from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.bookkeeping.plots import FIGURES, Run, panel_keys
from rlvr.trainer.sync_loop import train


@pytest.mark.parametrize(
    ("length", "want"),
    [
        (0, 0.0),
        (51, 0.0),  # L_max - L_cache: the longest turn left alone
        (52, (51 - 52) / 13 * 0.5),  # one token into the buffer
        (58, (51 - 58) / 13 * 0.5),
        (63, (51 - 63) / 13 * 0.5),
        (64, -0.5),  # the whole budget: a turn cut at max_new_tokens
        (70, -0.5),  # past the budget (eq. 13's third line)
    ],
    ids=lambda v: str(v),
)
def test_the_penalty_is_eq_13_of_dapo(length, want):
    # L_max = 64, L_cache = 13, penalty 0.5: R = ((L_max - L_cache) - |y|) / L_cache * 0.5 inside the buffer.
    assert overlong_reward(length, 64, 13, 0.5) == want


def test_a_zero_buffer_changes_nothing_and_a_full_buffer_ramps_from_the_first_token():
    assert all(overlong_reward(n, 8, 0, 1.0) == 0.0 for n in range(10))
    assert [overlong_reward(n, 4, 4, 1.0) for n in range(5)] == [0.0, -0.25, -0.5, -0.75, -1.0]


def test_each_model_turn_is_shaped_against_its_own_budget_and_summed_into_the_component():
    # Two model turns of 3 and 8 tokens with an env message of 2 tokens between them (mask 0).
    episode = Episode(
        group=0, task_id="t", prompt_ids=[1],
        token_ids=list(range(13)), loss_mask=[1] * 3 + [0] * 2 + [1] * 8, turn_ids=[0] * 5 + [1] * 8,
        turn_rewards=[0.25, 1.0], reward_components={"correct": 1.0},
    )  # fmt: skip
    assert turn_lengths(episode) == [3, 8]
    shape_overlong([episode], max_tokens=8, buffer=6, penalty=1.0)
    first, second = (2 - 3) / 6, -1.0  # L_max - L_cache = 2
    assert episode.turn_rewards == [0.25 + first, 1.0 + second]
    assert episode.reward_components == {"correct": 1.0, "overlong": first + second}
    assert episode.reward == pytest.approx(1.25 + first + second)


def test_the_component_reaches_the_record_and_the_reward(assets, tmp_path):
    # Step 1 samples with the same weights and seed in both runs: only the shaping differs.
    def first_record(out, **overrides):
        return read_metrics(train(tiny_config(assets, tmp_path / out, max_steps=1, **overrides)).metrics_path)[0]

    plain, shaped = first_record("plain"), first_record("shaped", overlong_buffer=8)
    assert "components/overlong_mean" not in plain  # 0 disables: no component, no number changed
    assert shaped["components/overlong_mean"] < 0  # every turn is in the 8-token buffer
    assert shaped["completion_length_mean"] == plain["completion_length_mean"]
    assert shaped["reward_mean"] == pytest.approx(plain["reward_mean"] + shaped["components/overlong_mean"])
    reward_figure = next(f for f in FIGURES if f.name == "reward")  # drawn beside the other components
    assert "components/overlong_mean" in panel_keys(reward_figure, [Run("shaped", [shaped])])
