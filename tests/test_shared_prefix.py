"""A group's shared prompt runs through the body once (issue 23): the padded pass's numbers.

``algorithm/shared_prefix.py`` runs each distinct prefix of a micro-batch once and every
row's rest through the prefix's cached keys and values. On ragged batches whose groups
share prompts, with multi-turn masks (0/1/0/1), the log-probabilities, entropies,
gradients and whole learner steps must be the padded pass's to float rounding; the body
must see fewer tokens; a micro-batch with nothing to share, or a model that fails the
probe, runs padded (the latter with one log line); and DeepSpeed ZeRO-3 ranks that
disagree on whether a micro-batch shares do not hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import pytest
import torch
from conftest import MASK_BLIND_ATTENTION, launch_two_ranks, ragged_episode
from conftest import learner_objective as _objective
from conftest import tiny_model as _model

from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.algorithm.logprobs import sequence_logprobs_and_entropy
from rlvr.trainer.algorithm.losses import make_loss_fn
from rlvr.trainer.algorithm.shared_prefix import SharedPrefix, scored_targets, shared_prefix_error
from rlvr.trainer.engines import torch_learner
from rlvr.trainer.engines.models import build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner

TOL = dict(atol=1e-6, rtol=1e-5)


def _assert_grads_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to rounding: a prefix's gradient sums its rows' in another order, so an entry that
    cancels to ~1e-3 of the largest keeps an absolute error of ~1e-6 of it (measured 1.0e-6 at 1.4)."""
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, want, atol=3e-6 * scale, rtol=1e-5)


WEIGHT_TOL = dict(atol=3e-5, rtol=0.0)  # AdamW's first step amplifies rounding near eps: see test_packing

# Two groups of four sharing a prompt each, then two rows of their own (a group of two whose
# prompts differ): single- and multi-turn, ragged.
SHAPES = [
    (20, [(4, 0)]),
    (20, [(3, 2), (5, 0)]),
    (20, [(2, 3), (2, 2), (6, 0)]),
    (20, [(1, 0)]),
    (16, [(14, 4), (16, 0)]),
    (16, [(5, 1), (1, 0)]),
    (16, [(3, 0)]),
    (16, [(6, 3), (2, 0)]),
    (7, [(2, 0)]),
    (5, [(4, 2), (1, 0)]),
]
GROUP = [0, 0, 0, 0, 1, 1, 1, 1, 2, 3]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _batch(tokenizer, seed: int = 0, rows: slice = slice(None)) -> TrainBatch:
    """The rows of ``SHAPES``: random tokens, a group's prompt shared by its rows, random advantages."""
    rng = torch.Generator().manual_seed(seed)
    episodes = [ragged_episode(rng, len(tokenizer), g, p, t) for g, (p, t) in zip(GROUP, SHAPES)]
    for i, episode in enumerate(episodes):
        episode.prompt_ids = list(episodes[GROUP.index(GROUP[i])].prompt_ids)  # the group leader's prompt
    advantages = [torch.randn(len(t), generator=rng).tolist() for _, t in SHAPES]
    return pack_episodes(episodes[rows], advantages[rows], tokenizer.pad_token_id)


def _plan(batch: TrainBatch) -> SharedPrefix | None:
    return SharedPrefix.plan(batch.input_ids, batch.attention_mask, batch.loss_mask)


@contextlib.contextmanager
def _sharing(on: bool):
    before = torch_learner.SHARE_PREFIX
    torch_learner.SHARE_PREFIX = on
    try:
        yield
    finally:
        torch_learner.SHARE_PREFIX = before


# --- the plan -------------------------------------------------------------------------------


def test_the_plan_groups_rows_by_the_tokens_before_their_first_scored_target():
    ids = torch.tensor(
        [
            [5, 6, 7, 8, 9, 0],  # prompt 5 6 7, then model tokens 8 9
            [5, 6, 7, 4, 0, 0],  # the same prompt
            [5, 2, 3, 8, 9, 7],  # a different prompt of the same length
            [5, 6, 7, 8, 4, 4],  # prompt 5 6 7 8: a longer prefix, not the first rows'
        ]
    )
    mask = (ids != 0).long()
    loss = torch.zeros(4, 5)
    loss[0, 2:4] = loss[1, 2] = loss[2, 2:5] = loss[3, 3:5] = 1  # column t scores token t+1
    plan = SharedPrefix.plan(ids, mask, loss)
    assert plan is not None
    assert plan.start.tolist() == [2, 2, 2, 3]  # the prompt but its last token
    assert plan.owner.tolist() == [0, 0, 1, 2]
    assert plan.prefix_ids.tolist() == [[5, 6, 0], [5, 2, 0], [5, 6, 7]]  # right-padded; distinct bytes
    assert plan.prefix_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert plan.suffix_ids.tolist() == [[7, 8, 9, 0], [7, 4, 0, 0], [3, 8, 9, 7], [8, 4, 4, 0]]
    assert plan.suffix_mask.sum(-1).tolist() == [3, 2, 4, 3]
    assert plan.saved_fraction == pytest.approx(1 - (7 + 12) / 21)
    valid = scored_targets(mask, loss)
    assert plan.suffix_valid(valid).sum() == valid.sum()
    assert torch.equal(plan.suffix_ids[plan.suffix_valid(valid)], ids[:, :-1][valid])  # same positions, same order


def test_no_plan_where_nothing_is_shared_or_a_row_cannot_have_a_prefix():
    ids = torch.tensor([[5, 6, 7, 8], [4, 6, 7, 8]])
    mask = torch.ones_like(ids)
    loss = torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    assert SharedPrefix.plan(ids, mask, loss) is None  # prefixes [5] and [4]
    ids[1, 0] = 5
    assert SharedPrefix.plan(ids, mask, loss) is not None  # both [5]
    assert SharedPrefix.plan(ids[:1], mask[:1], loss[:1]) is None  # one row
    loss = torch.tensor([[1.0, 1, 1], [0, 1, 1]])  # row 0 scores the target after its first token
    assert SharedPrefix.plan(ids, mask, loss) is None
    left_padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert SharedPrefix.plan(ids, left_padded, None) is None


def test_the_batch_shares_prompts_within_groups_only(tokenizer):
    plan = _plan(_batch(tokenizer))
    assert plan is not None
    assert plan.owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 3]
    assert 0.1 < plan.saved_fraction < 0.5


# --- shared equals padded -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logprobs_entropies_and_gradients_equal_the_padded_pass(tokenizer, attn):
    batch = _batch(tokenizer)
    results = []
    for prefix in (None, _plan(batch)):
        model = _model(tokenizer, attn=attn)
        scored = sequence_logprobs_and_entropy(
            model, batch.input_ids, batch.attention_mask, temperature=0.8, chunk_tokens=16,
            positions=batch.loss_mask, prefix=prefix,
        )  # fmt: skip
        ((scored.logprobs - 0.1 * scored.entropy) * batch.loss_mask * batch.advantages).sum().backward()
        results.append((scored, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (padded, padded_grads), (shared, shared_grads) = results
    assert (padded.logprobs != 0).sum() == batch.loss_mask.sum()
    torch.testing.assert_close(shared.logprobs, padded.logprobs, **TOL)
    torch.testing.assert_close(shared.entropy, padded.entropy, **TOL)
    _assert_grads_close(shared_grads, padded_grads)


def test_a_plan_for_other_targets_is_refused(tokenizer):
    batch = _batch(tokenizer)
    with pytest.raises(ValueError, match="inside a shared prefix"):
        sequence_logprobs_and_entropy(
            _model(tokenizer), batch.input_ids, batch.attention_mask, positions=None, prefix=_plan(batch)
        )


def _step(tokenizer, share: bool, *, micro_batch_size: int = 5, steps: int = 2, attn=None, **kw):
    """Learner steps from seed-0 weights: metrics, the last gradients, the new weights, and the body's tokens."""
    model = _model(tokenizer, attn=attn)
    beta, objective = kw.get("beta", 0.0), kw.get("objective", "grpo")
    ref = _model(tokenizer, seed=1, attn=attn) if beta > 0 else None  # a reference that differs: KL is not 0
    learner = TorchLearner(
        model, _objective(beta, kw.get("entropy_coef", 0.0), objective), learning_rate=1e-3, ref_model=ref,
        max_grad_norm=0.0, num_iterations=kw.get("num_iterations", 1), micro_batch_size=micro_batch_size,
        temperature=0.8,
    )  # fmt: skip
    tokens = []
    count = lambda m, a, k: tokens.append(int((k["input_ids"] != tokenizer.pad_token_id).sum()))  # noqa: E731
    model.model.register_forward_pre_hook(count, with_kwargs=True)  # real tokens through the body
    with _sharing(share):
        metrics = [learner.step(_batch(tokenizer, seed=s), on_policy=objective == "grpo") for s in range(steps)]
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return metrics, grads, weights, sum(tokens), learner


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({}, id="grpo"),
        pytest.param({"beta": 0.04}, id="reference"),
        pytest.param({"entropy_coef": 0.01, "micro_batch_size": 3}, id="entropy-bonus-groups-cut"),
        pytest.param(
            dict(beta=0.04, entropy_coef=0.01, num_iterations=2, objective="decoupled"),
            id="proximal-stale-reference-entropy",
        ),
    ],
)
def test_a_learner_step_equals_the_padded_one_with_fewer_tokens(tokenizer, kw):
    padded_metrics, padded_grads, padded_weights, padded_tokens, _ = _step(tokenizer, False, **kw)
    metrics, grads, weights, tokens, learner = _step(tokenizer, True, **kw)
    assert learner._shares is True
    _assert_grads_close(grads, padded_grads)
    torch.testing.assert_close(weights, padded_weights, **WEIGHT_TOL)
    for got, want in zip(metrics, padded_metrics, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if not key.startswith("memory/"):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    if kw.get("beta"):
        assert padded_metrics[1]["kl"] > 0
    assert tokens < 0.85 * padded_tokens  # the probe's tokens included (measured 0.68-0.81)


# --- the fallback ---------------------------------------------------------------------------


def test_the_probe_tells_which_attention_takes_a_shared_prefix(tokenizer):
    for attn in ("sdpa", "eager"):
        assert shared_prefix_error(_model(tokenizer, attn=attn), "cpu") is None, attn
    error = shared_prefix_error(_model(tokenizer, attn=MASK_BLIND_ATTENTION), "cpu")
    assert error and MASK_BLIND_ATTENTION in error


def test_a_model_that_fails_the_probe_runs_padded_and_says_so_once(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlvr.trainer.engines.torch_learner"):
        metrics, grads, _, tokens, learner = _step(tokenizer, True, attn=MASK_BLIND_ATTENTION)
    warnings = [r.getMessage() for r in caplog.records if "shared prompt" in r.getMessage()]
    assert len(warnings) == 1 and MASK_BLIND_ATTENTION in warnings[0]
    assert learner._shares is False
    want = _step(tokenizer, False, attn=MASK_BLIND_ATTENTION)
    torch.testing.assert_close(grads, want[1], rtol=0, atol=0)  # the very padded pass
    assert tokens > want[3]  # the probe's tokens on top


def test_packed_micro_batches_do_not_share(tokenizer):
    model = _model(tokenizer)
    learner = TorchLearner(model, make_loss_fn(), learning_rate=1e-3, micro_batch_tokens=64)
    batch = _batch(tokenizer)
    learner._packs_rows()
    assert learner._prefix_plans(batch, learner._micro_batches(batch)) == [None] * len(learner._micro_batches(batch))


# --- DeepSpeed ranks --------------------------------------------------------------------------


@pytest.mark.deepspeed
def test_zero3_ranks_that_disagree_on_sharing_follow_the_torch_trajectory(tmp_path, tokenizer):
    """Rank 0's shard shares prompts, rank 1's has one micro-batch that does not: no hang, torch's numbers."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    rows = slice(2, 10)  # rank 0: rows 2-5 (groups 0 and 1 cut); rank 1: rows 6-9 (group 1, then 2 and 3)
    batches = [_batch(tokenizer, seed=s, rows=rows) for s in range(2)]
    kw = dict(learning_rate=3e-3, max_grad_norm=0.5, micro_batch_size=2, num_iterations=2)
    shards = [b.shard(r, 2) for b in batches[:1] for r in range(2)]
    assert [_plan(s.select(slice(2, 4))) is None for s in shards] == [False, True]  # disagree on micro-batch 2
    assert _plan(shards[0].select(slice(0, 2))) is not None and _plan(shards[1].select(slice(0, 2))) is not None
    want = TorchLearner(_model(tokenizer), make_loss_fn(), **kw)
    want_metrics = [want.step(dataclasses.replace(b)) for b in batches]
    got = launch_two_ranks(tmp_path, batches, "3", kw)["3"]
    for g, w in zip(got, want_metrics, strict=True):
        for k in ("loss", "policy_loss", "grad_norm", "train_tokens", "ratio_mean"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    weights = torch.load(tmp_path / "weights_3.pt")
    for name, value in want.weights_for_generation().items():
        torch.testing.assert_close(weights[name].float(), value, rtol=0, atol=2e-5, msg=name)
