"""Dynamic sampling (DAPO): zero-spread groups leave the batch, extra rounds are bounded and reproducible.

The pure parts on hand-made groups (selection, the bound, the extra tasks, Ray's shards put
together), then short runs of the default model on arithmetic (group size 2, so that
zero-spread groups are common and extra rounds are played): the pipeline at eta 0 equals
the synchronous loop, a resumed run equals an uninterrupted one, and an env whose rewards
never spread plays exactly the bound and still takes its steps.
"""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_config
from safetensors.torch import load_file

from rlvr.trainer.algorithm.dynamic_sampling import (
    EXTRA_INDEX_STRIDE,
    extra_tasks,
    fill_batch,
    has_spread,
    learned_batch,
    round_seed,
)
from rlvr.trainer.algorithm.rollout import Episode, RolloutBatch, TaskRef
from rlvr.trainer.bookkeeping.metrics import dynamic_metrics, read_metrics
from rlvr.trainer.config import ConfigError, TrainConfig
from rlvr.trainer.pipeline.loop import train_async
from rlvr.trainer.step import Learning, TaskSchedule
from rlvr.trainer.sync_loop import train

TIMING = ("time/", "tokens_per_second", "generation_tokens_per_second", "async/", "memory/")
"""Wall-clock and memory keys: they differ between any two runs."""

FLAT_ENV = '''
from rlvr.envs.arithmetic import ArithmeticEnv
from rlvr.verifiers.types import Verdict


class FlatEnv(ArithmeticEnv):
    """Every answer scores 0.5: no group ever has spread."""

    def verify(self, completion, task):
        return Verdict(score=0.5, reason="flat")
'''


def _batch(*rewards: tuple[float, ...], seconds: float = 1.0) -> RolloutBatch:
    """A batch of groups with these episode returns (one turn each)."""
    groups = [
        [Episode(group=g, task_id=f"t{g}", prompt_ids=[], turn_rewards=[r]) for r in group]
        for g, group in enumerate(rewards)
    ]
    return RolloutBatch(groups=groups, generation_seconds=seconds, env_seconds=seconds / 2)


def _returns(batch: RolloutBatch) -> list[list[float]]:
    return [[e.reward for e in g] for g in batch.groups]


def _tasks(n: int) -> list[TaskRef]:
    return [TaskRef(index=i, seed=i) for i in range(n)]


# --- the pure parts -------------------------------------------------------------------------


def test_spread_is_max_minus_min_above_a_tolerance():
    assert has_spread([0.0, 1.0]) and has_spread([0.5, 0.5, 0.5 + 1e-6])
    assert not has_spread([1.0, 1.0]) and not has_spread([0.5, 0.5 + 1e-9])


def test_kept_groups_all_have_spread_the_size_is_kept_and_surplus_dropped():
    rounds = {1: _batch((0, 1), (1, 1), (0, 0)), 2: _batch((1, 0), (0, 1), (1, 1))}
    calls = []

    def play(r, tasks):
        calls.append((r, [t.index for t in tasks]))
        return rounds[r]

    first = _batch((1, 1), (0.2, 0.7), (0, 0))
    out = fill_batch(first, _tasks(3), 5, lambda r, played: _tasks(3), play)
    # round 0 gives 1 informative group, round 1 one more, round 2 two: the second is surplus
    assert [r for r, _ in calls] == [1, 2]
    assert _returns(out) == [[0.2, 0.7], [0, 1], [1, 0]]
    assert all(has_spread(r) for r in _returns(out))
    assert [e.group for e in out.episodes] == [0, 0, 1, 1, 2, 2]  # renumbered in learned order
    played = out.played
    assert (played.groups, played.zero_spread, played.rounds, played.quota) == (9, 5, 2, 3)
    assert played.episodes == 18 and played.reward_sum == pytest.approx(2.9 + 3 + 4)
    assert played.tokens == 0  # the hand-made episodes have no tokens; runs below count theirs
    assert (out.generation_seconds, out.env_seconds) == (3.0, 1.5)  # every round's time


def test_the_bound_on_rounds_holds_and_nothing_informative_learns_the_first_round():
    calls = []

    def play(r, tasks):
        calls.append(r)
        return _batch((1, 1), (0, 0))

    first = _batch((0, 0), (1, 1))
    out = fill_batch(first, _tasks(2), 3, lambda r, played: _tasks(2), play)
    assert calls == [1, 2, 3]
    assert out.groups == first.groups  # the round-0 groups: a zero policy gradient, but a step
    assert (out.played.rounds, out.played.groups, out.played.zero_spread) == (3, 8, 8)
    assert fill_batch(_batch((0, 0)), _tasks(1), 0, lambda r, p: _tasks(1), play).played.rounds == 0
    assert calls == [1, 2, 3]  # a bound of 0 plays no extra round


def test_a_short_step_learns_the_informative_groups_it_has_and_says_so():
    out = fill_batch(
        _batch((0, 1), (0, 0), (1, 1)),
        _tasks(3),
        1,
        lambda r, p: _tasks(3),
        lambda r, t: _batch((1, 1), (0, 0), (0, 0)),
    )
    learned, informative = learned_batch(out)
    assert _returns(learned) == [[0, 1]] and informative == 1
    metrics = dynamic_metrics(out.played, len(learned.groups), informative)
    assert metrics["dynamic/groups_short"] == 2 and metrics["dynamic/groups_dropped"] == 5
    assert metrics["dynamic/groups_learned"] == 1 and metrics["dynamic/no_informative"] == 0


def test_ray_shards_put_together_drop_a_shard_fallback_when_another_shard_found_spread():
    # Shard 0 found its quota; shard 1 found nothing and sent its zero-spread round 0.
    a = fill_batch(_batch((0, 1)), _tasks(1), 2, lambda r, p: _tasks(1), lambda r, t: _batch((1, 1)))
    b = fill_batch(_batch((1, 1)), _tasks(1), 2, lambda r, p: _tasks(1), lambda r, t: _batch((0, 0)))
    merged = RolloutBatch.merge([a, b])
    assert merged.played.groups == 4 and merged.played.rounds == 2 and merged.played.quota == 2
    learned, informative = learned_batch(merged)
    assert _returns(learned) == [[0, 1]] and informative == 1
    # Nothing informative anywhere: the whole batch is learned, and the record says so.
    nothing = RolloutBatch.merge([b, b])
    learned, informative = learned_batch(nothing)
    assert len(learned.groups) == 2 and informative == 0
    assert dynamic_metrics(nothing.played, 2, 0)["dynamic/no_informative"] == 1.0


def test_extra_tasks_are_a_function_of_seed_step_round_and_shard():
    def tasks(*args, exclude=frozenset()):
        return extra_tasks(*args, exclude)

    # finite dataset: distinct, in range, avoiding what the step played, and the same twice
    picked = tasks(0, 5, 1, 0, 4, 4, 10, exclude=frozenset({0, 1, 2}))
    assert picked == tasks(0, 5, 1, 0, 4, 4, 10, exclude=frozenset({0, 1, 2}))
    indices = [t.index for t in picked]
    assert len(set(indices)) == 4 and not set(indices) & {0, 1, 2} and all(0 <= i < 10 for i in indices)
    others = [tasks(1, 5, 1, 0, 4, 4, 10), tasks(0, 6, 1, 0, 4, 4, 10), tasks(0, 5, 2, 0, 4, 4, 10),
              tasks(0, 5, 1, 2, 4, 4, 10)]  # fmt: skip
    assert all(o != picked for o in others)
    assert len(tasks(0, 1, 1, 0, 5, 5, 2)) == 5  # a dataset smaller than a round: with replacement
    # procedural: never one of the schedule's tasks, nor another round's
    schedule = TaskSchedule(0, 4, None)
    main = {schedule(s, p).index for s in range(1, 50) for p in range(4)}
    extra = [
        t.index for s in range(1, 50) for r in (1, 2) for first in (0, 2) for t in tasks(0, s, r, first, 2, 4, None)
    ]
    assert len(set(extra)) == len(extra) and not main & set(extra)
    assert tasks(0, 3, 1, 0, 2, 4, None)[0] == TaskRef(index=EXTRA_INDEX_STRIDE + 8, seed=EXTRA_INDEX_STRIDE + 8)
    assert round_seed(123, 0) == 123 and round_seed(123, 1) != round_seed(123, 2)
    with pytest.raises(ValueError):
        tasks(0, 1, 0, 0, 2, 4, None)


def test_learner_ranks_must_divide_the_group_size_since_a_short_step_learns_fewer_groups():
    ranks = {"cluster": "ray", "learner": "deepspeed", "learner_ranks": 2, "dynamic_sampling": True}
    # The config refuses it before any model loads; Learning checks again for a launcher's ranks.
    with pytest.raises(ConfigError, match="2 learner ranks needs group_size \\(3\\) a multiple of them"):
        TrainConfig(group_size=3, prompts_per_step=2, **ranks)
    Learning(TrainConfig(group_size=4, prompts_per_step=3, **ranks), None, 0, lambda: None)  # type: ignore[arg-type]


# --- whole runs -------------------------------------------------------------------------------


def _arithmetic(out, **overrides):
    """The default model on arithmetic, groups of 2: zero-spread groups are common, extra rounds happen."""
    values = {"env": "arithmetic", "output_dir": str(out), "group_size": 2, "prompts_per_step": 3, "max_steps": 3,
              "max_new_tokens": 8, "learning_rate": 1e-3, "torch_threads": 1, "progress": False, "samples_every": 0,
              "dynamic_sampling": True, "max_sampling_rounds": 2}  # fmt: skip
    return TrainConfig(**(values | overrides))


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(TIMING)}


def _check_learned_batches(records: list[dict], prompts: int, shards: int = 1) -> None:
    for r in records:
        assert r["dynamic/groups_learned"] == prompts - r["dynamic/groups_short"]  # the size kept unless short
        assert r["zero_spread_fraction"] == 0.0  # no learned group without spread
        assert r["dynamic/rounds"] <= 2
        sampled = r["dynamic/groups_sampled"]  # one player: whole rounds; shards: each its own rounds
        assert sampled == prompts * (1 + r["dynamic/rounds"]) if shards == 1 else prompts <= sampled
        # every token sampled counts (dropped groups' too), at least the learned batch's
        assert r["generated_tokens"] >= r["completion_length_mean"] * r["dynamic/groups_learned"] * 2


def test_staleness_zero_equals_the_synchronous_loop(tmp_path):
    sync = train(_arithmetic(tmp_path / "sync"))
    fresh = train_async(_arithmetic(tmp_path / "async", max_staleness=0))
    want, got = read_metrics(sync.metrics_path), read_metrics(fresh.metrics_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert any(r["dynamic/rounds"] > 0 for r in want)  # extra rounds were played
    _check_learned_batches(want, 3)
    for s, a in zip(want, got):
        assert {k: a[k] for k in _comparable(s)} == _comparable(s), s["step"]
    weights, other = load_file(sync.checkpoint / "model.safetensors"), load_file(fresh.checkpoint / "model.safetensors")
    assert all(other[name].equal(t) for name, t in weights.items())


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = read_metrics(train(_arithmetic(tmp_path / "whole", max_steps=4)).metrics_path)
    train(_arithmetic(tmp_path / "parts", max_steps=2))
    resumed = read_metrics(train(_arithmetic(tmp_path / "parts", max_steps=4, resume="latest")).metrics_path)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert any(r["dynamic/rounds"] > 0 for r in whole[2:])  # the resumed steps played extra rounds
    assert [_comparable(r) for r in resumed] == [_comparable(r) for r in whole]


def test_rewards_without_spread_play_exactly_the_bound_and_still_step(assets, tmp_path, caplog):
    (tmp_path / "flat.py").write_text(FLAT_ENV)
    config = tiny_config(assets, tmp_path / "run", env=f"{tmp_path / 'flat.py'}:FlatEnv", max_steps=2,
                         dynamic_sampling=True, max_sampling_rounds=2)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="rlvr"):
        records = read_metrics(train(config).metrics_path)
    assert [r["step"] for r in records] == [1, 2]  # every step taken: versions stay in lockstep
    for r in records:
        assert r["dynamic/rounds"] == 2 and r["dynamic/groups_sampled"] == 6  # 2 groups x (1 + 2 rounds)
        assert r["dynamic/no_informative"] == 1 and r["dynamic/groups_short"] == 2
        assert r["dynamic/groups_learned"] == 2 and r["zero_spread_fraction"] == 1.0  # the round-0 groups
        assert r["grad_norm"] == 0.0  # zero advantages, no KL: nothing to learn
        assert r["dynamic/reward_mean_sampled"] == r["reward_mean"] == 0.5
    assert "0 of 2 groups informative after 2 extra sampling round(s)" in caplog.text


@pytest.mark.ray
def test_ray_one_generator_equals_the_synchronous_loop_and_shards_fill_their_own_quota(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'rlvr[ray]')")
    from rlvr.trainer.cluster.loop import train_ray  # imports Ray

    sync = read_metrics(train(_arithmetic(tmp_path / "sync", max_steps=2)).metrics_path)
    one = read_metrics(
        train_ray(_arithmetic(tmp_path / "one", max_steps=2, cluster="ray", max_staleness=0)).metrics_path
    )
    for s, r in zip(sync, one, strict=True):
        assert {k: r[k] for k in _comparable(s)} == _comparable(s), s["step"]
    # Two shards (groups 0-1 and 2), each its own quota: the accounting adds up over them.
    two = train_ray(_arithmetic(tmp_path / "two", max_steps=2, cluster="ray", max_staleness=0, num_generators=2))
    records = read_metrics(two.metrics_path)
    assert [r["ray/num_generators"] for r in records] == [2.0, 2.0]
    _check_learned_batches(records, 3, shards=2)
    assert any(r["dynamic/groups_sampled"] % 3 for r in records)  # the shards played different numbers of rounds
