"""The GRPO objective against values worked out by hand on small tensors."""

import math

import pytest
import torch

from rlvr.trainer.algorithm.advantages import SCALES, group_advantages
from rlvr.trainer.algorithm.losses import AGGREGATIONS, LossInputs, k3_kl, make_loss_fn
from rlvr.trainer.algorithm.surrogates import clipped_surrogate


def _inputs(logprobs, old, adv, mask, **kw) -> LossInputs:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=t(old),
        behavior_logprobs=t(old),
        advantages=t(adv),
        loss_mask=t(mask),
        **kw,
    )


# ratio, advantage -> expected per-token loss, clipped low?, clipped high?   (eps = 0.2)
SURROGATE_CASES = {
    "ratio-above-band-positive-adv-is-clipped": (1.5, 1.0, -1.2, False, True),
    "ratio-below-band-negative-adv-is-clipped": (0.5, -1.0, 0.8, True, False),
    "ratio-above-band-negative-adv-unclipped": (1.5, -1.0, 1.5, False, False),
    "ratio-below-band-positive-adv-unclipped": (0.5, 1.0, -0.5, False, False),
    "ratio-inside-band": (1.1, 2.0, -2.2, False, False),
    "ratio-one": (1.0, -3.0, 3.0, False, False),
}


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=list(SURROGATE_CASES))
def test_clipped_surrogate_by_hand(case):
    ratio, adv, want, low, high = SURROGATE_CASES[case]
    out = clipped_surrogate(
        torch.tensor([[math.log(ratio)]], dtype=torch.float64),
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([[adv]], dtype=torch.float64),
        0.2,
        0.2,
    )
    assert out.loss.item() == pytest.approx(want)
    assert out.clipped_low.item() is low
    assert out.clipped_high.item() is high


def test_asymmetric_clip_uses_each_epsilon():
    # eps_low = 0.1, eps_high = 0.3: ratio 1.25 with A > 0 is inside, 0.85 with A < 0 is clipped.
    out = clipped_surrogate(
        torch.log(torch.tensor([[1.25, 0.85]])), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 0.1, 0.3
    )
    assert out.loss.tolist()[0] == pytest.approx([-1.25, 0.9])
    assert out.clipped_high.tolist() == [[False, False]]
    assert out.clipped_low.tolist() == [[False, True]]


def test_k3_by_hand():
    # x = log(pi_ref / pi) = log 2: e^x - x - 1 = 2 - log 2 - 1
    got = k3_kl(torch.zeros(1), torch.tensor([math.log(2.0)]))
    assert got.item() == pytest.approx(1.0 - math.log(2.0), abs=1e-6)


def test_k3_nonnegative_and_zero_when_policies_agree():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=g) * 3
    ref = torch.randn(64, 32, generator=g) * 3
    assert (k3_kl(logp, ref) >= 0).all()
    assert k3_kl(logp, logp).abs().max().item() == 0.0


VALUES = [[1.0, 2.0, 3.0, 0.0], [4.0, 9.0, 9.0, 9.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
# sequence: (mean(1,2,3) + 4) / 2 = 3; token: (6 + 4) / 4 = 2.5; constant L = 4: 10 / (2 * 4)
AGG_CASES = {"sequence": 3.0, "token": 2.5, "constant": 1.25}


@pytest.mark.parametrize("name", AGG_CASES, ids=list(AGG_CASES))
def test_aggregation_by_hand(name):
    got = AGGREGATIONS[name](torch.tensor(VALUES), torch.tensor(MASK), 2, 4, 4.0)
    assert got.item() == pytest.approx(AGG_CASES[name])


def test_grpo_loss_by_hand_with_kl():
    # Two tokens, one sequence, token mean. ratio 1 everywhere, A = 1.
    # policy loss = -1; k3 of (logp=0, ref=log 2) = 1 - log 2 on token 0, 0 on token 1.
    loss_fn = make_loss_fn(beta=0.5, aggregation="token")
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    out = loss_fn(
        _inputs(
            logp,
            [[0.0, 0.0]],
            [[1.0, 1.0]],
            [[1.0, 1.0]],
            ref_logprobs=torch.tensor([[math.log(2.0), 0.0]], dtype=torch.float64),
        )
    )
    kl = (1 - math.log(2.0)) / 2
    assert out.policy_loss.item() == pytest.approx(-1.0)
    assert out.kl.item() == pytest.approx(kl)
    assert out.loss.item() == pytest.approx(-1.0 + 0.5 * kl)
    assert out.ratio_mean.item() == pytest.approx(1.0)


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_equal_rewards_give_zero_policy_gradient(aggregation, scale):
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7]], dtype=torch.float64)
    adv = group_advantages(rewards, SCALES[scale])  # [1, 4]
    assert adv.abs().max().item() == 0.0
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 5, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old = (logp.detach() + 0.3 * torch.randn(4, 5, generator=g, dtype=torch.float64)).tolist()
    loss_fn = make_loss_fn(aggregation=aggregation, constant=5.0)
    out = loss_fn(_inputs(logp, old, adv.T.expand(4, 5).tolist(), [[1.0] * 5] * 4))
    out.loss.backward()
    assert logp.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_ratio_one_gives_plain_policy_gradient_with_group_baseline(aggregation):
    # With pi_theta == pi_old the surrogate's gradient is -A grad log pi, i.e. REINFORCE with
    # the group mean as baseline (and the group std as scale), aggregated the same way.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    adv = group_advantages(rewards, SCALES["group"]).reshape(-1, 1)  # [8, 1]
    mask = torch.ones(8, 6, dtype=torch.float64)
    mask[:, 4:] = 0.0
    mask[0, 2:] = 0.0  # sequences of different lengths
    g = torch.Generator().manual_seed(2)
    logp = (torch.randn(8, 6, generator=g, dtype=torch.float64) - 1).requires_grad_()
    loss_fn = make_loss_fn(aggregation=aggregation, epsilon_low=0.1, epsilon_high=0.1, constant=6.0)
    out = loss_fn(_inputs(logp, logp.detach().tolist(), adv.expand(8, 6).tolist(), mask.tolist()))
    (grad,) = torch.autograd.grad(out.loss, logp)

    reinforce_logp = logp.detach().clone().requires_grad_()
    per_token = -adv * reinforce_logp  # [8, 6]
    pg = AGGREGATIONS[aggregation](per_token, mask, 8, int(mask.sum()), 6.0)
    (want,) = torch.autograd.grad(pg, reinforce_logp)
    torch.testing.assert_close(grad, want)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_micro_batches_add_up_to_the_full_batch(aggregation):
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(6, 5, generator=g, dtype=torch.float64)
    old = (logp + 0.2 * torch.randn(6, 5, generator=g, dtype=torch.float64)).tolist()
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64).expand(6, 5).tolist()
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    loss_fn = make_loss_fn(aggregation=aggregation, beta=0.1, constant=5.0)
    ref = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def run(rows):
        return loss_fn(
            LossInputs(
                logprobs=logp[rows],
                old_logprobs=torch.tensor(old)[rows],
                behavior_logprobs=torch.tensor(old)[rows],
                advantages=torch.tensor(adv)[rows],
                loss_mask=mask[rows],
                ref_logprobs=ref[rows],
                num_sequences=6,
                num_tokens=int(mask.sum()),
            )
        ).loss

    full = run(slice(0, 6))
    parts = run(slice(0, 2)) + run(slice(2, 5)) + run(slice(5, 6))
    assert parts.item() == pytest.approx(full.item())


def test_behavior_kl_reports_sampler_learner_mismatch():
    logp = torch.zeros(1, 2, dtype=torch.float64)
    same = make_loss_fn()(_inputs(logp, [[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]))
    assert same.behavior_kl.item() == 0.0
    differ = LossInputs(
        logprobs=logp,
        old_logprobs=logp,
        behavior_logprobs=torch.full((1, 2), math.log(2.0), dtype=torch.float64),
        advantages=torch.ones(1, 2, dtype=torch.float64),
        loss_mask=torch.ones(1, 2, dtype=torch.float64),
    )
    assert make_loss_fn()(differ).behavior_kl.item() == pytest.approx(1 - math.log(2.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"aggregation": "mean"}, "unknown aggregation 'mean'"), ({"objective": "ppo"}, "unknown objective 'ppo'")],
    ids=["bad-aggregation", "bad-objective"],
)
def test_make_loss_fn_rejects_unknown_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loss_fn(**kwargs)
