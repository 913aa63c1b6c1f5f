"""Rollouts through a plain gymnasium.Env, multi-turn masking, and batch packing.

Real parts only: the offline tokenizer, a tiny random Qwen2 and the transformers
generator. The environments here are plain ``gymnasium.Env`` subclasses (not rlvr's
``TextEnv``), to show that any env keeping the text contract works.
"""

from __future__ import annotations

import gymnasium
import pytest
import torch

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.advantages import SCALES, turn_advantages
from rlvr.trainer.algorithm.batch import pack_episodes
from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.algorithm.losses import LossInputs, make_loss_fn
from rlvr.trainer.algorithm.rollout import EnvMessageRenderer, TaskRef, collect_rollouts
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import SamplingParams


class FeedbackEnv(gymnasium.Env):
    """A plain Gymnasium env: any answer earns 0.25 and the feedback 'FEEDBACK k', for 3 turns."""

    def __init__(self, max_turns: int = 3):
        self.max_turns = max_turns

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.index, self.turn = (options or {})["index"], 0
        return [{"role": "user", "content": f"Task {self.index}: say something."}], {"task_id": f"t{self.index}"}

    def step(self, action):
        self.turn += 1
        if self.turn >= self.max_turns:
            return [], 0.25, False, True, {"reward_components": {"answered": 1.0}}
        return [{"role": "user", "content": f"FEEDBACK {self.turn}"}], 0.25, False, False, {}


class IgnoresTaskEnv(FeedbackEnv):
    """Breaks the contract: each reset gives a new task whatever the seed and options say."""

    count = 0

    def reset(self, *, seed=None, options=None):
        IgnoresTaskEnv.count += 1
        return super().reset(seed=seed, options={"index": IgnoresTaskEnv.count})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def generator(tokenizer):
    model = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)
    return TransformersGenerator(model, tokenizer, seed=0)


@pytest.fixture(scope="module")
def renderer(tokenizer, generator):
    return EnvMessageRenderer(tokenizer, generator.eos_ids)


def _play(generator, tokenizer, renderer, env_cls=FeedbackEnv, groups=2, group_size=2, max_context=4096):
    envs = [env_cls() for _ in range(groups * group_size)]
    tasks = [TaskRef(index=g, seed=g) for g in range(groups)]
    params = SamplingParams(max_new_tokens=6, seed=0)
    return collect_rollouts(envs, generator, tokenizer, renderer, tasks, group_size, params, max_context)


def _segments(episode):
    """Split an episode's tokens into runs of equal loss_mask: [(mask, [ids])]."""
    runs: list[tuple[int, list[int]]] = []
    for tok, m in zip(episode.token_ids, episode.loss_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(tok)
        else:
            runs.append((m, [tok]))
    return runs


def test_multiturn_episode_layout(generator, tokenizer, renderer):
    rollouts = _play(generator, tokenizer, renderer)
    assert [len(g) for g in rollouts.groups] == [2, 2]
    for episode in rollouts.episodes:
        assert episode.done and episode.num_turns == 3
        assert episode.turn_rewards == [0.25, 0.25, 0.25]
        assert episode.reward == 0.75
        assert episode.reward_components == {"answered": 1.0}
        runs = _segments(episode)
        # model, env, model, env, model
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
        for k, (_, ids) in enumerate(r for r in runs if r[0] == 0):
            text = tokenizer.decode(ids)
            assert text.endswith(f"<|im_start|>user\nFEEDBACK {k + 1}<|im_end|>\n<|im_start|>assistant\n")
        # behaviour logprobs: real (negative) on model tokens, 0 on env tokens
        for tok_lp, m in zip(episode.logprobs, episode.loss_mask):
            assert (tok_lp < 0) if m else (tok_lp == 0.0)
    assert rollouts.generation_seconds > 0 and rollouts.env_seconds > 0


def test_group_members_share_the_prompt_and_groups_differ(generator, tokenizer, renderer):
    rollouts = _play(generator, tokenizer, renderer)
    a, b = rollouts.groups
    assert a[0].prompt_ids == a[1].prompt_ids != b[0].prompt_ids
    assert [e.task_id for e in a + b] == ["t0", "t0", "t1", "t1"]


def test_env_that_ignores_the_task_index_is_rejected(generator, tokenizer, renderer):
    with pytest.raises(ValueError, match="different prompts to members of one group"):
        _play(generator, tokenizer, renderer, env_cls=IgnoresTaskEnv)


def test_context_limit_ends_the_episode(generator, tokenizer, renderer):
    # room for the prompt and one turn only
    rollouts = _play(generator, tokenizer, renderer, groups=1, max_context=40)
    for episode in rollouts.episodes:
        assert episode.num_turns == 1 and episode.context_truncated and episode.done


def test_renderer_frames_env_messages_after_eos_and_after_truncation(tokenizer, renderer):
    eos = tokenizer.eos_token_id
    feedback = [{"role": "user", "content": "tests failed"}]
    after_eos = tokenizer.decode(renderer.render([5, eos], feedback))
    after_cut = tokenizer.decode(renderer.render([5, 6], feedback))
    tail = "\n<|im_start|>user\ntests failed<|im_end|>\n<|im_start|>assistant\n"
    assert after_eos == tail
    assert after_cut == "<|im_end|>" + tail


def test_packed_batch_masks_env_tokens_and_matches_learner_logprobs(generator, tokenizer, renderer):
    rollouts = _play(generator, tokenizer, renderer)
    episodes = rollouts.episodes
    adv = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], SCALES["none"])
    # per-turn rewards of 0.25 each: reward-to-go 0.75, 0.5, 0.25 against the mean return 0.75
    assert adv[0][0] == pytest.approx([0.0, -0.25, -0.5])
    batch = pack_episodes(episodes, [a for g in adv for a in g], tokenizer.pad_token_id)
    targets = batch.input_ids[:, 1:]  # [B, T-1]
    for i, episode in enumerate(episodes):
        trained = targets[i][batch.loss_mask[i].bool()].tolist()
        assert trained == [t for t, m in zip(episode.token_ids, episode.loss_mask) if m]
        assert "FEEDBACK" not in tokenizer.decode(trained)
        assert set(batch.advantages[i][batch.loss_mask[i].bool()].tolist()) == {0.0, -0.25, -0.5}
    assert batch.num_tokens == sum(e.num_model_tokens for e in episodes)
    assert batch.num_sequences == len(episodes)
    # The learner's teacher-forced logprobs agree with the generator's on every trained token,
    # through the multi-turn contexts and the right padding of the batch.
    with torch.no_grad():
        learner_lp = sequence_logprobs(generator.model, batch.input_ids, batch.attention_mask)
    mask = batch.loss_mask.bool()
    torch.testing.assert_close(learner_lp[mask], batch.behavior_logprobs[mask], atol=1e-4, rtol=0)


def test_mask_truncated_drops_cut_episodes(generator, tokenizer, renderer):
    rollouts = _play(generator, tokenizer, renderer, groups=1)
    episodes = rollouts.episodes
    episodes[0].length_truncated, episodes[1].length_truncated = True, False
    adv = [[1.0] * e.num_turns for e in episodes]
    kept = pack_episodes(episodes, adv, tokenizer.pad_token_id, mask_truncated=False)
    masked = pack_episodes(episodes, adv, tokenizer.pad_token_id, mask_truncated=True)
    assert masked.loss_mask[0].sum() == 0 and masked.loss_mask[1].sum() == kept.loss_mask[1].sum() > 0
    assert masked.num_sequences == 1 and masked.num_tokens == int(kept.loss_mask[1].sum())


def test_micro_batches_are_trimmed_slices(generator, tokenizer, renderer):
    rollouts = _play(generator, tokenizer, renderer)
    adv = [[1.0] * e.num_turns for e in rollouts.episodes]
    batch = pack_episodes(rollouts.episodes, adv, tokenizer.pad_token_id)
    parts = list(batch.micro_batches(3))
    assert [p.size for p in parts] == [3, 1]
    assert sum(float(p.loss_mask.sum()) for p in parts) == batch.num_tokens
    for p in parts:
        assert p.attention_mask[:, -1].any()  # no all-padding column left at the end
        assert p.num_tokens == batch.num_tokens


def test_two_training_steps_on_code_multiturn(tokenizer, renderer):
    """The real multi-turn code env: test feedback is context, never a training target."""
    generator = TransformersGenerator(build_tiny_model(tokenizer, seed=1, **TEST_SIZE.__dict__), tokenizer)
    groups, group_size = 1, 2
    envs = [make_env("code-multiturn", max_turns=2) for _ in range(groups * group_size)]
    learner = TorchLearner(generator.model, make_loss_fn(), learning_rate=1e-3)
    for step in range(2):
        tasks = [TaskRef(index=step, seed=step)]
        params = SamplingParams(max_new_tokens=12, seed=step)
        rollouts = collect_rollouts(envs, generator, tokenizer, renderer, tasks, group_size, params, 4096)
        episodes = rollouts.episodes
        assert all(e.num_turns == 2 for e in episodes)  # a random model fails, gets feedback, retries
        adv = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], SCALES["group"])
        batch = pack_episodes(episodes, [a for g in adv for a in g], tokenizer.pad_token_id)
        targets = batch.input_ids[:, 1:]
        for i, episode in enumerate(episodes):
            prompt_cols = len(episode.prompt_ids) - 1
            real = batch.attention_mask[i, 1:].bool()
            env_cols = real & ~batch.loss_mask[i].bool()
            env_cols[:prompt_cols] = False
            feedback = tokenizer.decode(targets[i][env_cols].tolist())
            assert "Your program passed" in feedback or "not correct" in feedback, feedback
            assert batch.loss_mask[i].sum() == episode.num_model_tokens == len(episode.token_ids) - env_cols.sum()
        # The loss does not depend on the logprobs of environment tokens: with advantages
        # forced non-zero, their gradient is exactly zero and the model tokens' is not.
        logprobs = batch.behavior_logprobs.clone().requires_grad_()
        out = make_loss_fn()(
            LossInputs(
                logprobs=logprobs,
                old_logprobs=batch.behavior_logprobs,
                behavior_logprobs=batch.behavior_logprobs,
                advantages=torch.ones_like(logprobs),
                loss_mask=batch.loss_mask,
            )
        )
        out.loss.backward()
        assert (logprobs.grad[batch.loss_mask == 0] == 0).all()
        assert (logprobs.grad[batch.loss_mask == 1] != 0).all()
        metrics = learner.step(batch)
        assert metrics["train_tokens"] == sum(e.num_model_tokens for e in episodes)
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert learner.version == 2
