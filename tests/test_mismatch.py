"""The sampler/learner mismatch correction against a plain loop over sequences and tokens.

Notation as in ``algorithm/mismatch.py``: ``old`` is log pi_prox (the learner's), ``behavior``
is log mu (the sampler's), ``w = pi_prox / mu`` per token or per sequence, ``C`` the cap and
``F`` the floor. The reference below is written from those formulas, one scalar at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from rlvr.trainer.algorithm.batch import TrainBatch
from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.algorithm.losses import (
    AGGREGATIONS,
    IMPORTANCE_CAPS,
    IMPORTANCE_LEVELS,
    OBJECTIVES,
    LossInputs,
    importance_weights,
    make_loss_fn,
)
from rlvr.trainer.algorithm.mismatch import (
    CORRECTIONS,
    MISMATCH_LEVELS,
    mismatch_metrics,
    mismatch_weights,
    truncate,
)
from rlvr.trainer.algorithm.surrogates import SURROGATES
from rlvr.trainer.config import ConfigError, TrainConfig
from rlvr.trainer.engines import build
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner

F64 = torch.float64
CAP, FLOOR = 2.0, 0.5


def _case(seed: int):
    """A batch of 5 ragged rows (one with a hole, as a multi-turn episode has, one empty), ratios far from 1."""
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(5, 6, generator=g, dtype=F64) - 2).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(5, 6, generator=g, dtype=F64)
    behavior = old + 0.6 * torch.randn(5, 6, generator=g, dtype=F64)
    adv = torch.randn(5, 1, generator=g, dtype=F64).expand(5, 6).clone()
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=F64
    )
    return logp, old, behavior, adv, mask


def _inputs(logp, old, behavior, adv, mask, rows=slice(None)) -> LossInputs:
    return LossInputs(
        logprobs=logp[rows], old_logprobs=old[rows], behavior_logprobs=behavior[rows], advantages=adv[rows],
        loss_mask=mask[rows], num_sequences=int((mask.sum(-1) > 0).sum()), num_tokens=int(mask.sum()),
    )  # fmt: skip


def _reference_ratio(old, behavior, mask, i, t, level):
    """``w`` of token t of row i: its own ratio, or the product of its row's."""
    if level == "token":
        return math.exp(float(old[i, t] - behavior[i, t]))
    return math.prod(math.exp(float(old[i, s] - behavior[i, s])) for s in range(mask.shape[1]) if mask[i, s] > 0)


def _reference_weight(old, behavior, mask, i, t, correction, level):
    """``c(w)`` of token t of row i, from the formulas, one scalar at a time."""
    w = _reference_ratio(old, behavior, mask, i, t, level)
    if correction == "tis":
        return min(w, CAP)
    if correction == "mis":
        return w if FLOOR <= w <= CAP else 0.0
    return 1.0


def _reference_loss(logp, old, behavior, adv, mask, correction, level, aggregation, eps=0.2):
    """GRPO's clipped loss, each token's term times ``c(w)``: a loop over sequences and tokens."""
    rows, width = mask.shape
    num_sequences, num_tokens = int((mask.sum(-1) > 0).sum()), float(mask.sum())
    total = torch.zeros((), dtype=F64)
    for i in range(rows):
        tokens = [t for t in range(width) if mask[i, t] > 0]
        row = torch.zeros((), dtype=F64)
        for t in tokens:
            a = adv[i, t] * _reference_weight(old, behavior, mask, i, t, correction, level)
            r = torch.exp(logp[i, t] - old[i, t])
            row = row - torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
        if tokens:
            total = total + (row / len(tokens) / num_sequences if aggregation == "sequence" else row / num_tokens)
    return total


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
@pytest.mark.parametrize("level", MISMATCH_LEVELS)
@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_corrected_loss_and_gradient_equal_the_plain_loop(correction, level, aggregation):
    logp, old, behavior, adv, mask = _case(0)
    loss_fn = make_loss_fn(
        aggregation=aggregation, mismatch_correction=correction, mismatch_level=level, mismatch_cap=CAP,
        mismatch_floor=FLOOR,
    )  # fmt: skip
    got = loss_fn(_inputs(logp, old, behavior, adv, mask)).loss
    want = _reference_loss(logp, old, behavior, adv, mask, correction, level, aggregation)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (got_grad,) = torch.autograd.grad(got, logp)
    (want_grad,) = torch.autograd.grad(want, logp)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-14)
    # micro-batches: their losses and gradients add up to the whole batch's
    parts = [loss_fn(_inputs(logp, old, behavior, adv, mask, rows)).loss for rows in (slice(0, 2), slice(2, 5))]
    assert sum(p.item() for p in parts) == pytest.approx(got.item(), rel=1e-12)
    (parts_grad,) = torch.autograd.grad(parts[0] + parts[1], logp)
    torch.testing.assert_close(parts_grad, got_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
@pytest.mark.parametrize("level", MISMATCH_LEVELS)
def test_weights_and_flags_equal_the_formulas(correction, level):
    _, old, behavior, _, mask = _case(1)
    weights = mismatch_weights(
        old, behavior, mask, level=IMPORTANCE_LEVELS[level], correct=CORRECTIONS[correction], cap=CAP, floor=FLOOR
    )
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t] == 0:
                assert weights.weight[i, t] == 0 and not weights.masked[i, t] and not weights.truncated[i, t]
                continue
            w = _reference_ratio(old, behavior, mask, i, t, level)
            assert weights.ratio[i, t].item() == pytest.approx(w, rel=1e-12)
            assert weights.weight[i, t].item() == pytest.approx(
                _reference_weight(old, behavior, mask, i, t, correction, level), rel=1e-12
            )
            assert bool(weights.truncated[i, t]) == (w > CAP)
            assert bool(weights.masked[i, t]) == (w < FLOOR or w > CAP)


def test_metrics_by_hand():
    # one row, w = [1.5, 3, 0.25, (off the mask)] with C = 2, F = 0.5:
    # max 3, min 0.25; 'tis' truncates 1 of 3 tokens, 'mis' masks 2 of 3 (3 and 0.25)
    old = torch.zeros(1, 4, dtype=F64)
    behavior = torch.tensor([[-math.log(1.5), -math.log(3.0), -math.log(0.25), 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    adv = torch.ones(1, 4, dtype=F64)
    for correction in ("none", "tis", "mis"):  # the same numbers whether the correction is on or off
        out = make_loss_fn(mismatch_correction=correction, mismatch_cap=CAP, mismatch_floor=FLOOR)(
            LossInputs(old.clone().requires_grad_(), old, behavior, adv, mask)
        )
        assert out.extra["mismatch_ratio_max"].item() == pytest.approx(3.0)
        assert out.extra["mismatch_ratio_min"].item() == pytest.approx(0.25)
        assert out.extra["mismatch_truncated_fraction"].item() == pytest.approx(1 / 3)
        assert out.extra["mismatch_masked_fraction"].item() == pytest.approx(2 / 3)
        # at ratio 1 the loss is -mean(c(w) A): none 1, tis [1.5, 2, 0.25], mis [1.5, 0, 0]
        want = {"none": -1.0, "tis": -(1.5 + 2 + 0.25) / 3, "mis": -1.5 / 3}[correction]
        assert out.loss.item() == pytest.approx(want)
    # a micro-batch without trainable tokens reports the identities of max and min, never NaN
    empty = mismatch_metrics(
        mismatch_weights(old, behavior, 0 * mask, level=IMPORTANCE_LEVELS["token"], correct=truncate, cap=2, floor=0),
        0 * mask,
    )
    assert empty["mismatch_ratio_max"].item() == -math.inf and empty["mismatch_ratio_min"].item() == math.inf
    assert empty["mismatch_masked_fraction"].item() == 0.0


def _today(objective, on_policy, knobs):
    """The loss as make_loss_fn bound it before the correction existed: the objective's own function."""
    bound = dict(knobs, aggregate=AGGREGATIONS["token"], constant=1.0)
    if objective != "grpo":
        bound["weigh"] = lambda o, b, m: importance_weights(
            o, b, m, level=IMPORTANCE_LEVELS["token"], cap_fn=IMPORTANCE_CAPS["truncate"], cap=5.0
        )
        bound["on_policy"] = on_policy
    return lambda inputs: OBJECTIVES[objective](inputs, **bound)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("on_policy", [False, True], ids=["stale", "on-policy"])
@pytest.mark.parametrize("policy_loss", list(SURROGATES))
def test_none_is_todays_loss_bit_for_bit(objective, on_policy, policy_loss):
    logp, old, behavior, adv, mask = _case(2)
    ref = old - 0.1
    inputs = dataclasses.replace(_inputs(logp, old, behavior, adv, mask), ref_logprobs=ref)
    knobs = {"epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.05, "surrogate": SURROGATES[policy_loss]}
    want = _today(objective, on_policy, knobs)(inputs)
    got = make_loss_fn(
        objective=objective, on_policy=on_policy, policy_loss=policy_loss, epsilon_high=0.28, beta=0.05,
        mismatch_correction="none",
    )(inputs)  # fmt: skip
    for f in ("loss", "policy_loss", "kl", "clip_low_fraction", "clip_high_fraction", "ratio_mean", "behavior_kl"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert all(torch.equal(got.extra[k], v) for k, v in want.extra.items())
    assert torch.equal(torch.autograd.grad(got.loss, logp)[0], torch.autograd.grad(want.loss, logp)[0])


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("on_policy", [False, True], ids=["stale", "on-policy"])
@pytest.mark.parametrize("correction", ["tis", "mis"])
def test_the_correction_weighs_exactly_the_batches_whose_loss_ignores_mu(objective, on_policy, correction):
    logp, old, behavior, adv, mask = _case(3)
    inputs = _inputs(logp, old, behavior, adv, mask)
    knobs = {"objective": objective, "on_policy": on_policy, "mismatch_cap": CAP, "mismatch_floor": FLOOR}
    corrected = make_loss_fn(mismatch_correction=correction, **knobs)(inputs).loss
    untouched = make_loss_fn(mismatch_correction="none", **knobs)
    if objective == "grpo" or on_policy:  # the uncorrected loss with each advantage times c(w)
        c = torch.tensor(
            [[_reference_weight(old, behavior, mask, i, t, correction, "token") * float(mask[i, t] > 0)
              for t in range(6)] for i in range(5)], dtype=F64,
        )  # fmt: skip
        want = untouched(dataclasses.replace(inputs, advantages=adv * c)).loss
        assert corrected.item() == pytest.approx(want.item(), rel=1e-12)
        assert corrected.item() != untouched(inputs).loss.item()
    else:  # stale decoupled / plain already account for mu: not weighed twice
        assert torch.equal(corrected, untouched(inputs).loss)


@pytest.mark.parametrize("objective", ["decoupled", "plain"])
@pytest.mark.parametrize("correction", ["none", "tis", "mis"])
def test_on_policy_batches_take_the_same_loss_under_every_objective(objective, correction):
    # what keeps --max-staleness 0 equal to the synchronous loop (grpo), correction on or off
    logp, old, behavior, adv, mask = _case(4)
    inputs = _inputs(logp, old, behavior, adv, mask)
    grpo = make_loss_fn(mismatch_correction=correction)(inputs)
    fresh = make_loss_fn(objective=objective, on_policy=True, mismatch_correction=correction)(inputs)
    assert torch.equal(fresh.loss, grpo.loss)
    assert torch.equal(torch.autograd.grad(fresh.loss, logp)[0], torch.autograd.grad(grpo.loss, logp)[0])


def test_learner_reduces_the_metrics_over_micro_batches():
    # the record's max / min are the whole batch's, and the fractions its token means,
    # however the batch is cut into micro-batches
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 60, (4, 9), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 6:], attention[3, 4:] = 0, 0  # ragged rows, right-padded
    loss_mask = attention[:, 1:].double()
    loss_mask[:, :2] = 0  # the prompt
    with torch.no_grad():
        learner_logp = sequence_logprobs(model, ids, attention)
    behavior = (learner_logp + 0.7 * torch.randn(learner_logp.shape, generator=g)) * loss_mask
    batch = TrainBatch(
        input_ids=ids, attention_mask=attention, loss_mask=loss_mask.float(), advantages=torch.ones_like(behavior),
        behavior_logprobs=behavior, num_sequences=4, num_tokens=int(loss_mask.sum()),
    )  # fmt: skip
    w = torch.exp(learner_logp - behavior)[loss_mask > 0]
    records = [
        TorchLearner(
            build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__), make_loss_fn(mismatch_correction="mis"),
            learning_rate=1e-3, micro_batch_size=size,
        ).step(dataclasses.replace(batch))
        for size in (1, 4)
    ]  # fmt: skip
    for record in records:
        assert record["mismatch_ratio_max"] == pytest.approx(w.max().item(), rel=1e-5)
        assert record["mismatch_ratio_min"] == pytest.approx(w.min().item(), rel=1e-5)
        assert record["mismatch_masked_fraction"] == pytest.approx(((w < FLOOR) | (w > CAP)).double().mean().item())
        assert record["mismatch_truncated_fraction"] == pytest.approx((w > CAP).double().mean().item())
    assert 0 < records[0]["mismatch_masked_fraction"] < 1


# --- 'auto', resolved once per run by the generator ------------------------------------------


@pytest.mark.parametrize(
    "generator, device, vllm, want",
    [
        ("transformers", "cpu", True, "none"),
        ("auto", "cpu", True, "none"),  # auto samples with transformers on a CPU
        ("auto", "cuda", False, "none"),  # no vLLM: transformers
        ("auto", "cuda", True, "tis"),
        ("vllm", "cpu", True, "tis"),
    ],
)
def test_auto_is_resolved_by_the_generator(monkeypatch, generator, device, vllm, want):
    monkeypatch.setattr(build, "installed", lambda module: vllm if module == "vllm" else True)
    choice = build.choose_mismatch_correction(TrainConfig(generator=generator), torch.device(device))
    assert choice.kind == want and choice.reason.startswith("auto")


@pytest.mark.parametrize("requested", ["none", "tis", "mis"])
def test_a_requested_correction_is_kept_with_any_generator(monkeypatch, requested):
    monkeypatch.setattr(build, "installed", lambda module: True)
    for generator in ("transformers", "vllm"):
        config = TrainConfig(generator=generator, mismatch_correction=requested)
        assert build.choose_mismatch_correction(config, torch.device("cpu")).kind == requested


def test_build_objective_logs_the_correction_and_binds_it(caplog):
    config = TrainConfig(generator="transformers", mismatch_correction="mis", mismatch_cap=1.5, mismatch_floor=0.9)
    with caplog.at_level(logging.INFO, logger="rlvr.trainer.engines.build"):
        objective = build.build_objective(config, torch.device("cpu"))
    assert "mismatch correction: mis (requested)" in caplog.text
    logp, old, behavior, adv, mask = _case(6)
    inputs = _inputs(logp, old, behavior, adv, mask)
    want = make_loss_fn(mismatch_correction="mis", mismatch_cap=1.5, mismatch_floor=0.9)(inputs)
    assert torch.equal(objective.on_policy(inputs).loss, want.loss)
    assert torch.equal(objective.stale(inputs).loss, want.loss)  # grpo: stale batches too


def test_levels_and_knobs_are_checked():
    assert set(MISMATCH_LEVELS) == set(IMPORTANCE_LEVELS)
    with pytest.raises(ConfigError, match="mismatch_correction"):
        TrainConfig(mismatch_correction="icepop")
    with pytest.raises(ValueError, match="unknown mismatch_correction 'auto'"):
        make_loss_fn(mismatch_correction="auto")  # resolved in engines/build.py, never here
    with pytest.raises(ValueError, match="mismatch_floor < mismatch_cap"):
        make_loss_fn(mismatch_floor=2.0, mismatch_cap=2.0)
