"""Logits only where the loss reads them (issue 23): the lean path equals the full one.

The learner runs the LM head only on the target tokens its loss mask scores
(``torch_learner.LEAN_LOGITS``); the full path (every real position, recomputed in
backward) is kept for comparison. On ragged, padded batches with multi-turn masks
(0/1/0/1: prompt, model turn, environment message, model turn) the log-probabilities and
entropies at scored positions, the loss, every metric and the gradients of a learner step
must be the same numbers to float rounding; and each step reports its peak memory.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import learner_objective as _objective
from conftest import ragged_episode

from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.algorithm.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from rlvr.trainer.algorithm.losses import make_loss_fn
from rlvr.trainer.engines import torch_learner
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner

TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, seed: int = 0) -> torch.nn.Module:
    return build_tiny_model(tokenizer, seed=seed, **TEST_SIZE.__dict__)


def _batch(tokenizer, seed: int = 0) -> TrainBatch:
    """Six ragged episodes (right-padded by ``pack_episodes``), single- and multi-turn, random advantages."""
    rng = torch.Generator().manual_seed(seed)
    shapes = [
        (9, [(4, 0)]),
        (5, [(3, 2), (5, 0)]),
        (12, [(2, 3), (2, 2), (6, 0)]),
        (7, [(1, 0)]),
        (4, [(6, 4), (3, 0)]),
        (10, [(5, 1), (1, 0)]),
    ]
    episodes = [ragged_episode(rng, len(tokenizer), i // 3, p, turns) for i, (p, turns) in enumerate(shapes)]
    advantages = [(torch.randn(len(t), generator=rng)).tolist() for _, t in shapes]
    return pack_episodes(episodes, advantages, tokenizer.pad_token_id)


@contextlib.contextmanager
def _lean(on: bool):
    before = torch_learner.LEAN_LOGITS
    torch_learner.LEAN_LOGITS = on
    try:
        yield
    finally:
        torch_learner.LEAN_LOGITS = before


def test_the_batch_is_ragged_with_multi_turn_masks(tokenizer):
    batch = _batch(tokenizer)
    lengths = batch.attention_mask.sum(-1)
    assert len(set(lengths.tolist())) > 3 and (lengths < batch.input_ids.shape[1]).any()  # padding
    flips = (batch.loss_mask[:, 1:] != batch.loss_mask[:, :-1]).sum(-1)
    assert flips.max() >= 4  # 0 -> 1 -> 0 -> 1 -> 0 within one row


@pytest.mark.parametrize("chunk_tokens", [3, 1024], ids=["several-chunks", "one-chunk"])
def test_scored_positions_equal_the_full_path(tokenizer, chunk_tokens):
    model = _model(tokenizer)
    batch = _batch(tokenizer)
    kw = dict(temperature=0.7, chunk_tokens=chunk_tokens)
    with torch.no_grad():
        full = sequence_logprobs_and_entropy(model, batch.input_ids, batch.attention_mask, **kw)
        lean = sequence_logprobs_and_entropy(
            model, batch.input_ids, batch.attention_mask, positions=batch.loss_mask, **kw
        )
        only_lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, positions=batch.loss_mask, **kw)
    scored = batch.loss_mask.bool()
    torch.testing.assert_close(lean.logprobs[scored], full.logprobs[scored], **TOL)
    torch.testing.assert_close(lean.entropy[scored], full.entropy[scored], **TOL)
    torch.testing.assert_close(only_lp, lean.logprobs, atol=0, rtol=0)
    assert (lean.logprobs[~scored] == 0).all() and (lean.entropy[~scored] == 0).all()
    assert (full.logprobs[~scored] != 0).any()  # the full path did compute them


def test_gradients_of_scored_positions_equal_the_full_path(tokenizer):
    batch = _batch(tokenizer)
    grads = []
    for positions, recompute in ((None, True), (batch.loss_mask, None), (batch.loss_mask, True)):
        model = _model(tokenizer)
        lp = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, temperature=1.3, chunk_tokens=4,
            positions=positions, recompute_head=recompute,
        )  # fmt: skip
        (lp * batch.loss_mask * batch.advantages).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    torch.testing.assert_close(grads[2], grads[0], **TOL)


def test_positions_of_the_wrong_shape_are_refused(tokenizer):
    batch = _batch(tokenizer)
    with pytest.raises(ValueError, match="positions must be"):
        sequence_logprobs(_model(tokenizer), batch.input_ids, batch.attention_mask, positions=batch.attention_mask)


def _step(tokenizer, lean: bool, *, beta: float, entropy_coef: float, num_iterations: int, objective: str):
    """One learner step from seed-0 weights: its metrics, the last iteration's gradients, the new weights."""
    model = _model(tokenizer)
    ref = _model(tokenizer, seed=1) if beta > 0 else None  # a reference that differs: KL is not 0
    learner = TorchLearner(
        model, _objective(beta, entropy_coef, objective), learning_rate=1e-3, ref_model=ref,
        max_grad_norm=0.0, num_iterations=num_iterations, micro_batch_size=4, temperature=0.8,
    )  # fmt: skip
    with _lean(lean):
        metrics = learner.step(_batch(tokenizer), on_policy=objective == "grpo")
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return metrics, grads, weights


@pytest.mark.parametrize(
    ("beta", "entropy_coef", "num_iterations", "objective"),
    [
        pytest.param(0.0, 0.0, 1, "grpo", id="grpo"),
        pytest.param(0.04, 0.0, 1, "grpo", id="reference"),
        pytest.param(0.0, 0.01, 1, "grpo", id="entropy-bonus"),
        pytest.param(0.04, 0.01, 2, "decoupled", id="proximal-stale-reference-entropy"),
    ],
)
def test_a_learner_step_equals_the_full_path(tokenizer, beta, entropy_coef, num_iterations, objective):
    kw = dict(beta=beta, entropy_coef=entropy_coef, num_iterations=num_iterations, objective=objective)
    full, full_grads, full_weights = _step(tokenizer, False, **kw)
    lean, lean_grads, lean_weights = _step(tokenizer, True, **kw)
    assert full_grads.abs().max() > 0
    torch.testing.assert_close(lean_grads, full_grads, **TOL)
    torch.testing.assert_close(lean_weights, full_weights, **TOL)
    assert set(lean) == set(full)
    for key, value in full.items():
        if not key.startswith("memory/"):
            assert lean[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    if beta > 0:
        assert full["kl"] > 0
    assert full["entropy"] > 0


def test_each_step_reports_its_peak_memory(tokenizer):
    learner = TorchLearner(_model(tokenizer), make_loss_fn(), learning_rate=1e-3)
    metrics = learner.step(_batch(tokenizer))
    assert metrics["memory/peak_rss_gb"] > 0.01  # a python process with torch holds more than 10 MB
    assert not torch.cuda.is_available() or metrics["memory/gpu_allocated_gb"] > 0
    # The peak is the step's, not the process's: memory freed before the step does not count.
    big = torch.ones(400 * 2**20 // 4)  # 400 MB, touched
    del big
    assert learner.step(_batch(tokenizer))["memory/peak_rss_gb"] < metrics["memory/peak_rss_gb"] + 0.2


def test_several_chunks_keep_no_logits_for_backward(tokenizer):
    """Backward holds one chunk's ``[chunk, V]`` logits at a time, not every chunk's (several chunks)."""
    model = _model(tokenizer)
    batch = _batch(tokenizer)
    vocab = model.config.vocab_size
    for chunk_tokens, keeps_logits in ((4, False), (1024, True)):
        rows: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 2 and t.shape[-1] == vocab and t.shape[0] != vocab:  # [n, V] logits, not the weight
                rows.append(t.shape[0])  # noqa: B023 (read right below, in the same iteration)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sequence_logprobs(model, batch.input_ids, batch.attention_mask, chunk_tokens=chunk_tokens,
                              positions=batch.loss_mask)  # fmt: skip
        assert bool(rows) == keeps_logits, rows
