"""TorchLearner on a real tiny Qwen2: what one step does to the weights and the policy."""

from __future__ import annotations

import pytest
import torch

from rlvr.trainer.algorithm.advantages import SCALES, turn_advantages
from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.algorithm.chat import encode_chat
from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.algorithm.losses import LossInputs, Objective, make_loss_fn
from rlvr.trainer.algorithm.rollout import Episode
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import SamplingParams

GROUP = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, seed=0):
    return build_tiny_model(tokenizer, seed=seed, **TEST_SIZE.__dict__)


def _batch(tokenizer, model, rewards: list[list[float]]) -> TrainBatch:
    """Sample len(rewards) groups of GROUP completions and pack them with these rewards."""
    generator = TransformersGenerator(model, tokenizer, seed=0)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": f"What is {g}+1?"}]) for g in range(len(rewards))]
    samples = generator.generate(prompts, GROUP, SamplingParams(max_new_tokens=6, seed=1))
    episodes = []
    for g, group in enumerate(samples):
        for c, r in zip(group, rewards[g]):
            episodes.append(
                Episode(
                    group=g,
                    task_id=str(g),
                    prompt_ids=c.prompt_ids,
                    token_ids=c.token_ids,
                    loss_mask=[1] * len(c.token_ids),
                    logprobs=c.logprobs,
                    turn_ids=[0] * len(c.token_ids),
                    turn_rewards=[r],
                    completions=[c.text],
                    versions=[c.version],
                )
            )
    adv = turn_advantages([[[r] for r in group] for group in rewards], SCALES["group"])
    return pack_episodes(episodes, [a for g in adv for a in g], tokenizer.pad_token_id)


def _learner(model, **kw) -> TorchLearner:
    loss_kw = {k: kw.pop(k) for k in ("aggregation", "beta") if k in kw}
    return TorchLearner(model, make_loss_fn(**loss_kw), learning_rate=kw.pop("learning_rate", 1e-3), **kw)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _completion_logprob(model, batch: TrainBatch) -> torch.Tensor:
    """Summed log-probability of each row's trained tokens: [B]."""
    with torch.no_grad():
        lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask)
    return (lp * batch.loss_mask).sum(-1)


def test_equal_rewards_leave_the_weights_unchanged(tokenizer):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0] * GROUP, [0.0] * GROUP])
    before = _weights(model)
    metrics = _learner(model).step(batch)
    assert metrics["grad_norm"] == 0.0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_first_iteration_is_on_policy(tokenizer):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0]])
    metrics = _learner(model).step(batch)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_low_fraction"] == metrics["clip_high_fraction"] == 0.0
    # the generator's logprobs and the learner's pi_prox agree: sampler and learner match
    assert metrics["behavior_kl"] < 1e-6
    assert metrics["grad_norm"] > 0 and metrics["entropy"] > 0
    assert metrics["train_tokens"] == batch.num_tokens


def test_a_step_moves_probability_toward_rewarded_completions(tokenizer):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    before = _completion_logprob(model, batch)
    _learner(model, learning_rate=3e-3).step(batch)
    change = _completion_logprob(model, batch) - before  # [8]
    rewarded = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    assert (change[rewarded] > 0).all(), change
    assert change[rewarded].mean() > change[~rewarded].mean() + 0.1


@pytest.mark.parametrize("aggregation", ["sequence", "token", "constant"])
def test_micro_batching_gives_the_same_gradient(tokenizer, aggregation):
    grads = []
    for micro_batch_size in (1, 3, 16):
        model = _model(tokenizer)
        batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0]])
        _learner(model, aggregation=aggregation, micro_batch_size=micro_batch_size, max_grad_norm=0.0).step(batch)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[2], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[2], atol=1e-6, rtol=1e-4)


def test_num_iterations_reuses_the_stored_old_logprobs(tokenizer):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0]])
    learner = _learner(model, num_iterations=3, learning_rate=3e-3)
    metrics = learner.step(batch)
    assert learner.optimizer.state_dict()["state"][0]["step"] == 3  # three AdamW steps
    assert learner.version == 1  # one policy published per generation batch
    # iterations 2 and 3 see pi_theta != pi_old, so the mean ratio departs from 1
    assert abs(metrics["ratio_mean"] - 1.0) > 1e-4


def test_kl_to_the_reference_starts_at_zero_and_grows(tokenizer):
    model, ref = _model(tokenizer), _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0]])
    learner = _learner(model, beta=0.1, ref_model=ref, learning_rate=3e-3)
    first = learner.step(batch)
    batch.old_logprobs = None  # the next generation batch: pi_prox is recomputed
    second = learner.step(batch)
    assert first["kl"] == 0.0
    assert second["kl"] > 0.0
    assert all(not p.requires_grad for p in ref.parameters())


def test_save_and_load_restore_weights_optimizer_and_version(tokenizer, tmp_path):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0]])
    learner = _learner(model)
    learner.step(batch)
    learner.save(str(tmp_path / "ckpt"))
    restored = _learner(_model(tokenizer, seed=123))
    restored.load(str(tmp_path / "ckpt"))
    assert restored.version == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    # the next step is identical from both, so the optimizer moments came back too
    for lrn in (learner, restored):
        b = _batch(tokenizer, lrn.model, [[0.0, 1.0, 1.0, 0.0]])
        lrn.step(b)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(restored.model.state_dict()[name], tensor, atol=1e-6, rtol=0)


def test_a_batch_with_nothing_to_train_is_skipped(tokenizer):
    model = _model(tokenizer)
    batch = _batch(tokenizer, model, [[1.0, 0.0, 0.0, 1.0]])
    batch.loss_mask.zero_()
    batch.num_tokens = batch.num_sequences = 0
    before = _weights(model)
    metrics = _learner(model).step(batch)
    assert metrics["skipped"] == 1.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_an_entropy_bonus_raises_the_policy_entropy_where_rewards_teach_nothing(tokenizer):
    # Equal rewards: zero advantages, so the bonus is the only gradient. Without it nothing
    # moves (first test above); with it the entropy of the trained positions rises step by step.
    model = _model(tokenizer)
    with torch.no_grad():  # a peaked policy (random init is near the uniform's maximum entropy)
        model.get_output_embeddings().weight.mul_(5.0)
    batch = _batch(tokenizer, model, [[1.0] * GROUP, [0.0] * GROUP])
    objective = Objective(
        stale=make_loss_fn(entropy_coef=1.0), on_policy=make_loss_fn(entropy_coef=1.0), needs_entropy=True
    )
    learner = TorchLearner(model, objective, learning_rate=1e-3)
    entropies = [learner.step(batch)["entropy"] for _ in range(4)]
    assert all(b > a for a, b in zip(entropies, entropies[1:])), entropies
    with pytest.raises(ValueError, match="needs LossInputs.entropy"):
        TorchLearner(_model(tokenizer), make_loss_fn(entropy_coef=1.0), learning_rate=1e-2).step(batch)


def test_the_entropy_bonus_is_minus_coef_times_the_aggregated_entropy():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    entropy = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for aggregation in ("token", "sequence"):
        base = make_loss_fn(aggregation=aggregation)(LossInputs(logp, logp, logp, adv, mask)).loss
        with_bonus = make_loss_fn(aggregation=aggregation, entropy_coef=0.3)(
            LossInputs(logp, logp, logp, adv, mask, entropy=entropy)
        ).loss
        if aggregation == "token":
            want = base - 0.3 * (entropy * mask).sum() / mask.sum()
        else:
            want = base - 0.3 * ((entropy * mask).sum(-1) / mask.sum(-1)).mean()
        assert with_bonus.item() == pytest.approx(want.item(), rel=1e-12)
        (grad,) = torch.autograd.grad(with_bonus, entropy)
        assert (grad[mask == 0] == 0).all() and (grad[mask > 0] < 0).all()
