"""The decoupled objective (and the plain one) against values worked out by hand.

Notation as in ``algorithm/losses.py``: ``old`` is log pi_prox, ``behavior`` is log mu, ``w = pi_prox/mu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.trainer.algorithm.losses import AGGREGATIONS, LossInputs, make_loss_fn

F64 = torch.float64


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def _inputs(logprobs, old, behavior, adv, mask=None) -> LossInputs:
    logprobs = logprobs if isinstance(logprobs, torch.Tensor) else _t(logprobs)
    return LossInputs(
        logprobs=logprobs,
        old_logprobs=_t(old),
        behavior_logprobs=_t(behavior),
        advantages=_t(adv),
        loss_mask=_t(mask if mask is not None else [[1.0] * len(row) for row in adv]),
    )


# One sequence of two tokens, pi_theta = pi_prox (ratio 1), A = 1, token mean, cap C = 2.
# w = pi_prox / mu = [1.5, 3]: token level truncates to [1.5, 2] or masks to [1.5, 0];
# sequence level is the product 4.5 on both tokens: truncated to 2, or masked to 0.
# name -> (level, mode, expected loss, capped fraction)
CAP_CASES = {
    "token-truncate": ("token", "truncate", -(1.5 + 2.0) / 2, 0.5),
    "token-mask": ("token", "mask", -(1.5 + 0.0) / 2, 0.5),
    "sequence-truncate": ("sequence", "truncate", -2.0, 1.0),
    "sequence-mask": ("sequence", "mask", 0.0, 1.0),
}


@pytest.mark.parametrize("case", CAP_CASES, ids=list(CAP_CASES))
def test_capped_importance_weights_by_hand(case):
    level, mode, want, capped = CAP_CASES[case]
    loss_fn = make_loss_fn(objective="decoupled", is_cap=2.0, is_level=level, is_mode=mode)
    logp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    out = loss_fn(_inputs(logp, [[0.0, 0.0]], [[-math.log(1.5), -math.log(3.0)]], [[1.0, 1.0]]))
    assert out.loss.item() == pytest.approx(want)
    assert out.extra["is_capped_fraction"].item() == pytest.approx(capped)
    raw = [1.5, 3.0] if level == "token" else [4.5, 4.5]
    assert out.extra["is_weight_mean"].item() == pytest.approx(sum(raw) / 2)
    assert out.extra["is_weight_max"].item() == pytest.approx(max(raw))
    assert out.extra["is_weight_min"].item() == pytest.approx(min(raw))
    # at ratio 1 the gradient is -w A / N per token: the weight scales the policy gradient
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert grad.sum().item() == pytest.approx(want)


def test_weight_multiplies_the_clipped_surrogate():
    # rho = pi_theta / pi_prox = 1.5 with A = 1 is clipped at 1.2; w = pi_prox / mu = 1.5:
    # loss = -1.5 * 1.2 = -1.8, and the clip is reported.
    loss_fn = make_loss_fn(objective="decoupled", is_cap=5.0)
    out = loss_fn(_inputs([[math.log(1.5)]], [[0.0]], [[-math.log(1.5)]], [[1.0]]))
    assert out.loss.item() == pytest.approx(-1.8)
    assert out.clip_high_fraction.item() == 1.0
    assert out.ratio_mean.item() == pytest.approx(1.5)


def test_plain_takes_the_ratio_against_the_behaviour_policy():
    # pi_theta = pi_prox = 1, mu = 0.5, A = 1. Plain: rho = pi_theta / mu = 2, clipped to 1.2.
    # Decoupled: rho = 1 (no clip), weight 2 (at the cap): loss -2.
    case = ([[0.0]], [[0.0]], [[math.log(0.5)]], [[1.0]])
    plain = make_loss_fn(objective="plain")(_inputs(*case))
    assert plain.loss.item() == pytest.approx(-1.2)
    assert plain.clip_high_fraction.item() == 1.0
    assert plain.ratio_mean.item() == pytest.approx(2.0)
    # the divergence diagnostic stays KL(pi_prox || mu), not mu against itself
    assert plain.behavior_kl.item() == pytest.approx(0.5 - math.log(0.5) - 1)
    decoupled = make_loss_fn(objective="decoupled", is_cap=2.0)(_inputs(*case))
    assert decoupled.loss.item() == pytest.approx(-2.0)
    assert decoupled.clip_high_fraction.item() == 0.0


def _random_case(seed: int, stale: bool):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(6, 5, generator=g, dtype=F64) - 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=g, dtype=F64)
    behavior = old + (0.4 * torch.randn(6, 5, generator=g, dtype=F64) if stale else 0.0)
    adv = torch.randn(6, 1, generator=g, dtype=F64).expand(6, 5)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1.0
    return logp, old, behavior, adv, mask


@pytest.mark.parametrize("objective", ["decoupled", "plain"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_with_mu_equal_to_pi_prox_it_is_the_grpo_loss(objective, level, aggregation):
    logp, old, behavior, adv, mask = _random_case(0, stale=False)
    knobs = {"aggregation": aggregation, "beta": 0.1, "constant": 5.0}
    ref = old - 0.2
    losses, grads = [], []
    for name, extra in (("grpo", {}), (objective, {"is_level": level, "is_mode": "mask", "is_cap": 1.5})):
        out = make_loss_fn(objective=name, **knobs, **extra)(
            LossInputs(
                logprobs=logp, old_logprobs=old, behavior_logprobs=behavior, advantages=adv, loss_mask=mask,
                ref_logprobs=ref,
            )
        )  # fmt: skip
        losses.append(out.loss.item())
        grads.append(torch.autograd.grad(out.loss, logp)[0])
    assert losses[1] == losses[0]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_decoupled_micro_batches_add_up_to_the_full_batch(level):
    logp, old, behavior, adv, mask = _random_case(1, stale=True)
    loss_fn = make_loss_fn(objective="decoupled", is_level=level, is_cap=1.3, aggregation="sequence")

    def run(rows):
        return loss_fn(
            LossInputs(
                logprobs=logp[rows], old_logprobs=old[rows], behavior_logprobs=behavior[rows],
                advantages=adv[rows], loss_mask=mask[rows], num_sequences=6, num_tokens=int(mask.sum()),
            )
        ).loss  # fmt: skip

    full = run(slice(0, 6))
    assert (run(slice(0, 2)) + run(slice(2, 6))).item() == pytest.approx(full.item())


def test_stale_samples_change_the_decoupled_gradient_but_not_grpo():
    logp, old, behavior, adv, mask = _random_case(2, stale=True)
    outs = {}
    for name in ("grpo", "decoupled"):
        out = make_loss_fn(objective=name, is_cap=100.0)(LossInputs(logp, old, behavior, adv, mask))
        outs[name] = torch.autograd.grad(out.loss, logp)[0]
    # uncapped, the decoupled gradient is GRPO's with every token scaled by exp(old - behavior)
    ratio_grad = outs["grpo"] * torch.exp(old - behavior)
    torch.testing.assert_close(outs["decoupled"], ratio_grad)
    assert not torch.allclose(outs["decoupled"], outs["grpo"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"is_level": "episode"}, "unknown is_level 'episode'"),
        ({"is_mode": "clip"}, "unknown is_mode 'clip'"),
        ({"objective": "decoupled", "is_cap": 0.0}, "is_cap must be > 0"),
    ],
    ids=["bad-level", "bad-mode", "zero-cap"],
)
def test_bad_importance_knobs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loss_fn(**kwargs)


@pytest.mark.parametrize("objective", ["decoupled", "plain"])
def test_on_policy_batches_get_the_grpo_loss_and_still_log_the_mismatch(objective):
    # A batch sampled by the weights being learned from: mu is pi_prox, whatever rounding says.
    logp, old, _, adv, mask = _random_case(3, stale=False)
    rounding = old + 1e-6 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    grpo = make_loss_fn()(LossInputs(logp, old, rounding, adv, mask))
    fresh = make_loss_fn(objective=objective, on_policy=True)(LossInputs(logp, old, rounding, adv, mask))
    stale = make_loss_fn(objective=objective)(LossInputs(logp, old, rounding, adv, mask))
    assert fresh.loss.item() == grpo.loss.item()
    assert stale.loss.item() != grpo.loss.item()  # the rounding would otherwise leak into the loss
    assert 0 < fresh.extra["behavior_abs_log_diff"].item() < 1e-5
    assert fresh.extra["is_weight_max"].item() > 1.0 > fresh.extra["is_weight_min"].item()
