"""Packed micro-batches (issue 23): a token budget, no padding, the padded path's numbers.

With ``micro_batch_tokens`` the learner groups rows by a token budget and runs each group
as one padding-free sequence (``algorithm/packing.py``). On ragged batches with
multi-turn masks (0/1/0/1: prompt, model turn, environment message, model turn) the
log-probabilities, entropies, loss, metrics and gradients must be the padded path's to
float rounding, with a reference and an entropy bonus, per-token and per-sequence
aggregation; the plan keeps the budget; an attention that cannot keep packed rows apart
falls back to padding with one log line; DeepSpeed ranks with different shards run as
many micro-batches; and the pipeline at ``--max-staleness 0`` still equals the
synchronous loop with packing on.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import MASK_BLIND_ATTENTION, launch_two_ranks, ragged_episode, tiny_config
from conftest import learner_objective as _objective
from conftest import tiny_model as _model
from safetensors.torch import load_file

from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.algorithm.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from rlvr.trainer.algorithm.losses import make_loss_fn
from rlvr.trainer.algorithm.packing import PackedRows, even_out, packed_attention_error, plan_micro_batches
from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.config import ConfigError, TrainConfig
from rlvr.trainer.engines.models import build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner

TOL = dict(atol=1e-6, rtol=1e-5)
# Weights after AdamW steps: Adam's first update is about lr * g / (|g| + eps), so a gradient
# entry near eps (1e-8) that differs by float rounding (other micro-batch sums) moves by up
# to ~1e-5 at lr 1e-3 (measured: 1.1e-5); a wrong gradient moves weights by ~lr.
WEIGHT_TOL = dict(atol=3e-5, rtol=0.0)
BUDGET = 48  # tokens: the batch below makes 4-5 groups, and its longest row (40) nearly fills one


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _batch(tokenizer, seed: int = 0) -> TrainBatch:
    """Eight ragged, long-tailed episodes (5 to 40 tokens), single- and multi-turn, random advantages."""
    rng = torch.Generator().manual_seed(seed)
    shapes = [
        (9, [(4, 0)]),
        (5, [(3, 2), (5, 0)]),
        (12, [(2, 3), (2, 2), (6, 0)]),
        (4, [(1, 0)]),
        (6, [(14, 4), (16, 0)]),
        (10, [(5, 1), (1, 0)]),
        (7, [(3, 0)]),
        (8, [(6, 3), (2, 0)]),
    ]
    episodes = [ragged_episode(rng, len(tokenizer), i // 4, p, turns) for i, (p, turns) in enumerate(shapes)]
    advantages = [(torch.randn(len(t), generator=rng)).tolist() for _, t in shapes]
    return pack_episodes(episodes, advantages, tokenizer.pad_token_id)


def _lengths(batch: TrainBatch) -> list[int]:
    return batch.attention_mask.sum(-1).tolist()


# --- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("budget", [1, 7, 20, 64, 10_000])
def test_the_plan_keeps_the_budget(padded, budget):
    lengths = torch.randint(1, 40, (37,), generator=torch.Generator().manual_seed(budget)).tolist()
    lengths[3] = 70  # longer than most budgets
    groups = plan_micro_batches(lengths, budget, padded=padded)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each row exactly once
    for g in groups:
        cost = len(g) * max(lengths[i] for i in g) if padded else sum(lengths[i] for i in g)
        assert cost <= budget or len(g) == 1, (g, cost)  # only a lone row may exceed it
        assert g == sorted(g)
    assert plan_micro_batches(lengths, budget, padded=padded) == groups  # a function of the lengths
    if budget >= (len(lengths) * max(lengths) if padded else sum(lengths)):
        assert len(groups) == 1


def test_first_fit_fills_groups():
    # Longest first: 9 and 8 open a group each, 5 fits neither, the 1s fill the first gaps.
    assert plan_micro_batches([5, 9, 1, 8, 1, 1], 10) == [[1, 2], [3, 4, 5], [0]]
    # Padded, a group costs rows x its longest: 1 joins 5 (2 x 5), the next 1s open their own.
    assert plan_micro_batches([5, 9, 1, 8, 1, 1], 10, padded=True) == [[1], [3], [0, 2], [4, 5]]
    with pytest.raises(ValueError, match="budget"):
        plan_micro_batches([3], 0)


def test_even_out_splits_the_heaviest_groups():
    lengths = [10, 1, 1, 1, 7, 2]
    groups = even_out([[0, 1, 2, 3], [4, 5]], 4, lengths)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(6))
    assert even_out(groups, 2, lengths) == groups  # never merges
    with pytest.raises(ValueError, match="cannot make"):
        even_out([[0], [1]], 3, lengths)


def test_packed_rows_layout():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0], [4, 0, 0]])
    mask = (ids != 0).long()
    rows = PackedRows.of(ids, mask)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert rows.cu_seq_lens.tolist() == [0, 3, 5, 6] and rows.max_length == 3
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()  # targets: (0,0) (0,1) (1,0)
    assert rows.target_index(valid).tolist() == [0, 1, 3]
    assert "cu_seq_lens_q" in rows.model_kwargs("flash_attention_2")
    assert "cu_seq_lens_q" not in rows.model_kwargs("sdpa")
    with pytest.raises(ValueError, match="right-padded"):
        PackedRows.of(ids, torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0]]))


# --- packed equals padded -------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lean", [True, False], ids=["loss-positions", "every-position"])
def test_packed_logprobs_and_gradients_equal_padded(tokenizer, attn, lean):
    batch = _batch(tokenizer)
    positions = batch.loss_mask if lean else None
    results = []
    for packed in (False, True):
        model = _model(tokenizer, attn=attn)
        scored = sequence_logprobs_and_entropy(
            model, batch.input_ids, batch.attention_mask, temperature=0.8, chunk_tokens=16,
            positions=positions, packed=packed,
        )  # fmt: skip
        ((scored.logprobs - 0.1 * scored.entropy) * batch.loss_mask * batch.advantages).sum().backward()
        results.append((scored, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed.logprobs, padded.logprobs, **TOL)  # zeros where not scored, both
    torch.testing.assert_close(packed.entropy, padded.entropy, **TOL)
    assert padded_grads.abs().max() > 0
    torch.testing.assert_close(packed_grads, padded_grads, **TOL)


def test_the_body_sees_one_sequence_without_padding(tokenizer):
    batch = _batch(tokenizer)
    model = _model(tokenizer)
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with torch.no_grad():
        sequence_logprobs(model, batch.input_ids, batch.attention_mask, packed=True)
    (kw,) = seen
    assert kw["attention_mask"] is None and kw["input_ids"].shape == (1, sum(_lengths(batch)))


def _step(tokenizer, micro_batch_tokens: int, *, attn: str | None = None, steps: int = 1, **kw):
    """Learner steps from seed-0 weights: the metrics, the last iteration's gradients, the new weights."""
    model = _model(tokenizer, attn=attn)
    beta, objective = kw.get("beta", 0.0), kw.get("objective", "grpo")
    ref = _model(tokenizer, seed=1, attn=attn) if beta > 0 else None  # a reference that differs: KL is not 0
    learner = TorchLearner(
        model, _objective(beta, kw.get("entropy_coef", 0.0), objective, kw.get("aggregation", "token")),
        learning_rate=1e-3, ref_model=ref, max_grad_norm=0.0, num_iterations=kw.get("num_iterations", 1),
        micro_batch_size=3, micro_batch_tokens=micro_batch_tokens, temperature=0.8,
    )  # fmt: skip
    metrics = [learner.step(_batch(tokenizer, seed=s), on_policy=objective == "grpo") for s in range(steps)]
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return metrics, grads, weights, learner


def _assert_same_step(got, want):
    got_metrics, got_grads, got_weights, _ = got
    want_metrics, want_grads, want_weights, _ = want
    assert want_grads.abs().max() > 0
    torch.testing.assert_close(got_grads, want_grads, **TOL)
    torch.testing.assert_close(got_weights, want_weights, **WEIGHT_TOL)
    for g, w in zip(got_metrics, want_metrics, strict=True):
        assert set(g) == set(w)
        for key, value in w.items():
            if not key.startswith("memory/"):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({}, id="grpo"),
        pytest.param({"aggregation": "sequence"}, id="sequence-aggregation"),
        pytest.param({"beta": 0.04}, id="reference"),
        pytest.param({"entropy_coef": 0.01}, id="entropy-bonus"),
        pytest.param(
            dict(beta=0.04, entropy_coef=0.01, num_iterations=2, objective="decoupled", aggregation="sequence"),
            id="proximal-stale-reference-entropy-sequence",
        ),
    ],
)
def test_a_packed_learner_step_equals_the_padded_one(tokenizer, kw):
    padded = _step(tokenizer, 0, **kw)
    packed = _step(tokenizer, BUDGET, **kw)
    _assert_same_step(packed, padded)
    assert packed[3]._packs is True
    if kw.get("beta"):
        assert padded[0][0]["kl"] > 0
    assert padded[0][0]["entropy"] > 0


@pytest.mark.parametrize("budget", [1, 30, 10_000], ids=["a-row-each", "longest-alone", "one-group"])
def test_any_budget_gives_the_same_step(tokenizer, budget):
    _assert_same_step(_step(tokenizer, budget, beta=0.04, steps=2), _step(tokenizer, 0, beta=0.04, steps=2))


def test_ranks_get_as_many_micro_batches(tokenizer, monkeypatch):
    """Another rank planned more micro-batches: this one splits its groups to match, same numbers."""
    want = _step(tokenizer, 0, beta=0.04)
    model = _model(tokenizer)
    learner = TorchLearner(model, make_loss_fn(beta=0.04), learning_rate=1e-3, ref_model=_model(tokenizer, seed=1),
                           max_grad_norm=0.0, micro_batch_tokens=10_000, temperature=0.8)  # fmt: skip
    fake = lambda sums: {k: 6.0 if k == "micro_batches_max" else v for k, v in sums.items()}  # noqa: E731
    monkeypatch.setattr(learner, "_all_reduce", fake)
    assert len(learner._micro_batches(_batch(tokenizer))) == 6
    metrics = learner.step(_batch(tokenizer))
    assert metrics["loss"] == pytest.approx(want[0][0]["loss"], rel=1e-5)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), want[1], **TOL)


# --- the fallback ---------------------------------------------------------------------------


def test_the_probe_tells_which_attention_keeps_rows_apart(tokenizer):
    for attn in ("sdpa", "eager"):
        assert packed_attention_error(_model(tokenizer, attn=attn), "cpu") is None, attn
    error = packed_attention_error(_model(tokenizer, attn=MASK_BLIND_ATTENTION), "cpu")
    assert error and MASK_BLIND_ATTENTION in error and "does not keep packed rows apart" in error


def test_an_attention_that_cannot_pack_falls_back_to_padding_once(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlvr.trainer.engines.torch_learner"):
        fallback = _step(tokenizer, BUDGET, attn=MASK_BLIND_ATTENTION, beta=0.04, steps=2)
    warnings = [r.getMessage() for r in caplog.records if "--micro-batch-tokens" in r.getMessage()]
    assert len(warnings) == 1 and "falling back to padded micro-batches" in warnings[0]
    assert fallback[3]._packs is False
    _assert_same_step(fallback, _step(tokenizer, 0, beta=0.04, steps=2))
    groups = fallback[3]._micro_batches(_batch(tokenizer))
    lengths = _lengths(_batch(tokenizer))
    assert all(len(g) * max(lengths[i] for i in g.tolist()) <= BUDGET or len(g) == 1 for g in groups)


def test_the_flag_is_checked():
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        TrainConfig(micro_batch_tokens=-1)
    assert TrainConfig().micro_batch_tokens == 0


# --- DeepSpeed ranks and the pipeline ---------------------------------------------------------


@pytest.mark.deepspeed
def test_two_deepspeed_ranks_with_uneven_shards_follow_the_torch_trajectory(tmp_path, tokenizer):
    """ZeRO-3 on two ranks whose shards pack into different counts: no hang, the padded torch numbers."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    batches = [_batch(tokenizer, seed=s) for s in range(2)]
    lengths = [_lengths(b) for b in batches]
    half = len(lengths[0]) // 2
    budget = next(
        n for n in range(20, 80)
        if len(plan_micro_batches(lengths[0][:half], n)) != len(plan_micro_batches(lengths[0][half:], n))
    )  # fmt: skip
    kw = dict(learning_rate=3e-3, max_grad_norm=0.5, micro_batch_size=3, num_iterations=2)
    want = TorchLearner(_model(tokenizer), make_loss_fn(), **kw)
    want_metrics = [want.step(dataclasses.replace(b)) for b in batches]
    got = launch_two_ranks(tmp_path, batches, "3", {**kw, "micro_batch_tokens": budget})["3"]
    for g, w in zip(got, want_metrics, strict=True):
        for k in ("loss", "policy_loss", "grad_norm", "train_tokens", "ratio_mean"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), k
    weights = torch.load(tmp_path / "weights_3.pt")
    for name, value in want.weights_for_generation().items():
        torch.testing.assert_close(weights[name].float(), value, rtol=0, atol=2e-5, msg=name)


def test_staleness_zero_with_packing_reproduces_the_synchronous_loop(assets, tmp_path):
    from rlvr.trainer.pipeline.loop import train_async
    from rlvr.trainer.sync_loop import train

    packing = {"micro_batch_tokens": 40, "beta": 0.04}
    sync = train(tiny_config(assets, tmp_path / "sync", **packing))
    fresh = train_async(tiny_config(assets, tmp_path / "async", max_staleness=0, **packing))
    sync_records, async_records = read_metrics(sync.metrics_path), read_metrics(fresh.metrics_path)
    assert [r["step"] for r in async_records] == [1, 2, 3]
    keys = ("reward_mean", "reward_std", "completion_length_mean", "loss", "grad_norm", "kl")
    for s, a in zip(sync_records, async_records, strict=True):
        assert {k: a[k] for k in keys} == {k: s[k] for k in keys}, s["step"]
    assert any(r["grad_norm"] > 0 for r in sync_records)
    want, got = load_file(sync.checkpoint / "model.safetensors"), load_file(fresh.checkpoint / "model.safetensors")
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # bitwise


def test_lora_packed_equals_padded(tokenizer):
    """LoRA adapters (and the adapters-off reference of --beta) take packed rows like the full model."""
    pytest.importorskip("peft")
    from rlvr.trainer.engines.lora import AdaptersOff, LoraSettings, apply_lora

    results = []
    for budget in (0, BUDGET):
        model = _model(tokenizer)
        torch.manual_seed(0)  # the adapters' initial A
        apply_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "up_proj")))
        learner = TorchLearner(model, make_loss_fn(beta=0.04), learning_rate=1e-2, ref_model=AdaptersOff(model),
                               max_grad_norm=0.0, micro_batch_size=3, micro_batch_tokens=budget)  # fmt: skip
        metrics = [learner.step(_batch(tokenizer, seed=s)) for s in range(2)]  # step 2: adapters moved, KL > 0
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((metrics, grads))
    (padded, padded_grads), (packed, packed_grads) = results
    assert padded[1]["kl"] > 0 and padded_grads.abs().max() > 0
    torch.testing.assert_close(packed_grads, padded_grads, **TOL)
    for key in ("loss", "kl", "grad_norm", "entropy"):
        assert packed[1][key] == pytest.approx(padded[1][key], rel=1e-5, abs=1e-6), key
