"""GSPO and CISPO against deliberately plain implementations written from the papers' formulas.

Each plain version loops over sequences and tokens in Python with scalar tensors; the
production version works on ``[B, T]`` tensors. Equal losses and equal gradients (with
respect to the current log-probabilities) on random batches with prompt and padding masks,
ragged lengths, clipped and unclipped ratios, whole and in micro-batches.
"""

import pytest
import torch

from rlvr.trainer.algorithm.losses import LossInputs, make_loss_fn

B, T = 6, 9
EPS_LOW, EPS_HIGH = 0.05, 0.08


def _batch(seed: int, per_sequence_advantage: bool = True):
    """Current and old log-probs (some ratios far outside the clip), advantages, a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.15
    behavior = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))  # prompt tokens before
        length = int(torch.randint(1, T - start + 1, (1,), generator=g))  # padding after
        mask[i, start : start + length] = 1.0
    if per_sequence_advantage:
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logp, old, behavior, adv, mask


def _grad(loss_of, logp):
    x = logp.clone().requires_grad_(True)
    loss = loss_of(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _clip(x, low=EPS_LOW, high=EPS_HIGH):
    return torch.clamp(x, 1 - low, 1 + high)


def plain_gspo_sequence(logp, old, adv, mask):
    """Zheng et al. 2025, eq. (5)-(7): J = 1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = (pi/pi_old)^(1/|y_i|)."""
    total = torch.zeros((), dtype=logp.dtype)
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        log_s = sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens)
        s = torch.exp(log_s)
        a = adv[i, tokens[0]]
        total = total - torch.minimum(s * a, _clip(s) * a)
    return total / logp.shape[0]


def plain_gspo_token(logp, old, adv, mask):
    """GSPO-token, eq. (13)-(14): s_{i,t} = sg[s_i] pi(y_t) / sg[pi(y_t)], token-mean aggregation."""
    total, count = torch.zeros((), dtype=logp.dtype), 0
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[i, t] > 0]
        s_value = torch.exp(sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens)).detach()
        for t in tokens:
            s = s_value * torch.exp(logp[i, t] - logp[i, t].detach())
            total = total - torch.minimum(s * adv[i, t], _clip(s) * adv[i, t])
            count += 1
    return total / count


def plain_cispo(logp, old, adv, mask):
    """MiniMax-M1 (2025), eq. (4): J = 1/sum|o_i| sum_i sum_t sg(clip(r_{i,t})) A_{i,t} log pi(o_{i,t})."""
    total, count = torch.zeros((), dtype=logp.dtype), 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t] > 0:
                r = torch.exp(logp[i, t] - old[i, t]).detach()
                total = total - _clip(r) * adv[i, t] * logp[i, t]
                count += 1
    return total / count


CASES = {
    "gspo-sequence": ("gspo", "sequence", True, plain_gspo_sequence),
    "gspo-token": ("gspo", "token", False, plain_gspo_token),
    "cispo": ("cispo", "token", False, plain_cispo),
}


def _loss_fn(policy_loss, aggregation, **kw):
    return make_loss_fn(
        policy_loss=policy_loss, aggregation=aggregation, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, **kw
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_surrogate_equals_the_plain_formula(case, seed):
    policy_loss, aggregation, per_sequence, plain = CASES[case]
    logp, old, behavior, adv, mask = _batch(seed, per_sequence)
    loss_fn = _loss_fn(policy_loss, aggregation)
    got_loss, got_grad = _grad(lambda x: loss_fn(LossInputs(x, old, behavior, adv, mask)).loss, logp)
    want_loss, want_grad = _grad(lambda x: plain(x, old, adv, mask), logp)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert (got_grad[mask == 0] == 0).all(), "no gradient reaches prompt or padding"
    out = loss_fn(LossInputs(logp, old, behavior, adv, mask))
    assert out.clip_low_fraction + out.clip_high_fraction > 0, "the batch exercises the clip"


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_micro_batches_add_up_to_the_whole_batch(case):
    policy_loss, aggregation, per_sequence, _ = CASES[case]
    logp, old, behavior, adv, mask = _batch(3, per_sequence)
    loss_fn = _loss_fn(policy_loss, aggregation)
    whole_loss, whole_grad = _grad(lambda x: loss_fn(LossInputs(x, old, behavior, adv, mask)).loss, logp)
    n_seq, n_tok = B, int(mask.sum())

    def in_parts(x):
        parts = [slice(0, 2), slice(2, B)]
        return sum(
            loss_fn(LossInputs(x[p], old[p], behavior[p], adv[p], mask[p], num_sequences=n_seq, num_tokens=n_tok)).loss
            for p in parts
        )

    parts_loss, parts_grad = _grad(in_parts, logp)
    assert parts_loss.item() == pytest.approx(whole_loss.item(), rel=1e-12)
    assert torch.allclose(parts_grad, whole_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_the_behaviour_weight_of_the_decoupled_objective_scales_the_advantage(case):
    policy_loss, aggregation, per_sequence, plain = CASES[case]
    logp, old, behavior, adv, mask = _batch(4, per_sequence)
    cap = 1.2
    loss_fn = _loss_fn(policy_loss, aggregation, objective="decoupled", is_cap=cap, is_level="sequence")
    got_loss, got_grad = _grad(lambda x: loss_fn(LossInputs(x, old, behavior, adv, mask)).loss, logp)
    # AReaL's weight pi_prox / mu of the whole sequence, truncated at the cap, on each of its tokens
    weight = torch.exp(((old - behavior) * mask).sum(-1, keepdim=True)).clamp(max=cap).expand(B, T)
    want_loss, want_grad = _grad(lambda x: plain(x, old, adv * weight, mask), logp)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-10)
    assert torch.allclose(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert (weight[mask > 0] < cap).any() and (weight[mask > 0] == cap).any(), "some weights capped, some not"


def test_on_the_first_iteration_every_surrogate_is_the_policy_gradient():
    logp, _, behavior, adv, mask = _batch(5, per_sequence_advantage=True)
    grads = {}
    for name in ("clip", "gspo", "cispo"):
        loss_fn = _loss_fn(name, "sequence")
        _, grads[name] = _grad(lambda x, f=loss_fn: f(LossInputs(x, x.detach(), behavior, adv, mask)).loss, logp)
    assert torch.allclose(grads["gspo"], grads["clip"]) and torch.allclose(grads["cispo"], grads["clip"])
    assert grads["clip"].abs().sum() > 0


def test_an_unknown_policy_loss_is_refused():
    with pytest.raises(ValueError, match="unknown policy_loss"):
        make_loss_fn(policy_loss="ppo2")
