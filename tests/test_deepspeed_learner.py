"""DeepSpeedLearner against TorchLearner: the same trajectory at ZeRO 0-3, alone and on two ranks.

Every test runs real DeepSpeed on its CPU accelerator (gloo) with the tiny random Qwen2
of the suite. The reference is TorchLearner on the same initial weights and batches
(sampled once, fixed rewards), with micro-batching (8 rows, micro-batches of 3), two
iterations per batch (so the losses are not ~0 and pi_prox is scored), warmup and
clipping that bites (the norms are ~1.2-1.9 against a limit of 0.5).

Tolerances, measured on this machine (2 CPU cores, torch 2.13, DeepSpeed 0.19.8):

- ZeRO 0 in one process is bit-for-bit TorchLearner (same torch optimizer, same clip);
- ZeRO 2/3, offload (ZeRO 2) and two ranks (ZeRO 0/2/3): metrics differ by at most
  1.7e-5 relative (the gradient norm, which DeepSpeed sums in another order; two ranks
  also split the micro-batches differently), weights by at most 4.7e-6 after four steps.
  We assert rel 1e-4 on metrics and atol 2e-5 on weights: ~5x slack, and far below what
  a wrong accumulation boundary or a missing world-size factor gives
  (weights off by ~1e-2, grad_norm off by a factor).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import launch_two_ranks
from test_learner import _batch

from rlvr.trainer.algorithm.losses import Objective, make_loss_fn
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.trainer.engines.torch_learner import TorchLearner

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "rlvr" / "torch_extensions"))
from rlvr.trainer.engines.deepspeed_learner import DeepSpeedLearner  # noqa: E402

pytestmark = pytest.mark.deepspeed

KW = dict(learning_rate=3e-3, max_grad_norm=0.5, warmup_steps=2, micro_batch_size=3, num_iterations=2)
REWARDS = ([[1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0]], [[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.2, 0.0]])
STEPS = 4
METRIC_RTOL, METRIC_ATOL, WEIGHT_ATOL = 1e-4, 1e-6, 2e-5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer):
    return build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)


@pytest.fixture(scope="module")
def batches(tokenizer):
    model = _model(tokenizer)
    return [_batch(tokenizer, model, REWARDS[i % 2]) for i in range(STEPS)]


def _run(learner, batches) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    metrics = [learner.step(_copy(b)) for b in batches]
    return metrics, {k: v.detach().cpu().clone() for k, v in learner.weights_for_generation().items()}


def _copy(batch):
    return dataclasses.replace(batch)  # step fills pi_prox into its own copy, but keep ours clean anyway


@pytest.fixture(scope="module")
def reference(tokenizer, batches):
    metrics, weights = _run(TorchLearner(_model(tokenizer), make_loss_fn(), **KW), batches)
    assert all(m["grad_norm"] > KW["max_grad_norm"] for m in metrics), "clipping is not exercised"
    assert all(abs(m["loss"]) > 1e-4 for m in metrics[1:]), "losses too small to compare"
    return metrics, weights


def _learned(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics of what was learned: without ``memory/`` peaks, which differ between any two processes."""
    return {k: v for k, v in metrics.items() if not k.startswith("memory/")}


def _assert_same(got, want, exact=False):
    got_metrics, got_weights = [_learned(m) for m in got[0]], got[1]
    want_metrics, want_weights = [_learned(m) for m in want[0]], want[1]
    for step, (g, w) in enumerate(zip(got_metrics, want_metrics, strict=True)):
        assert set(g) == set(w), f"step {step}: metric names differ: {set(g) ^ set(w)}"
        for k in w:
            tol = (0, 0) if exact else (METRIC_RTOL, METRIC_ATOL)
            assert g[k] == pytest.approx(w[k], rel=tol[0], abs=tol[1]), f"step {step}: {k}"
    assert set(got_weights) == set(want_weights)
    for k, w in want_weights.items():
        assert got_weights[k].shape == w.shape, k
        torch.testing.assert_close(got_weights[k].float(), w, rtol=0, atol=0 if exact else WEIGHT_ATOL, msg=k)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_one_process_follows_the_torch_trajectory(tokenizer, batches, reference, stage):
    learner = DeepSpeedLearner(_model(tokenizer), make_loss_fn(), zero_stage=stage, **KW)
    got = _run(learner, batches)
    _assert_same(got, reference, exact=stage == 0)
    assert learner.version == STEPS
    if stage == 3:  # gathered whole (shapes checked above), the tied LM head under its own name too
        assert "lm_head.weight" in got[1]
        assert got[1]["lm_head.weight"].data_ptr() == got[1]["model.embed_tokens.weight"].data_ptr() or torch.equal(
            got[1]["lm_head.weight"], got[1]["model.embed_tokens.weight"]
        )


def test_offloaded_optimizer_follows_the_torch_trajectory(tokenizer, batches, reference):
    learner = DeepSpeedLearner(_model(tokenizer), make_loss_fn(), zero_stage=2, offload_optimizer=True, **KW)
    assert type(learner.engine.basic_optimizer).__name__ == "DeepSpeedCPUAdam"
    _assert_same(_run(learner, batches), reference)


def test_each_batch_says_which_loss_of_the_objective_it_takes(tokenizer, batches):
    # The objective is chosen at setup; step(batch, on_policy=...) picks its on-policy or its stale loss.
    objective = Objective(stale=make_loss_fn(), on_policy=make_loss_fn(aggregation="sequence"))
    learner = DeepSpeedLearner(_model(tokenizer), objective, zero_stage=0, **KW)
    on_policy = TorchLearner(_model(tokenizer), make_loss_fn(aggregation="sequence"), **KW).step(_copy(batches[0]))
    stale = TorchLearner(_model(tokenizer), make_loss_fn(), **KW).step(_copy(batches[0]))
    assert on_policy != stale  # the two losses differ on this batch
    assert _learned(learner.step(_copy(batches[0]), on_policy=True)) == _learned(on_policy)
    stale_too = TorchLearner(_model(tokenizer), objective, **KW).step(_copy(batches[0]), on_policy=False)
    assert _learned(stale_too) == _learned(stale)


def test_two_processes_follow_the_torch_trajectory(tmp_path, batches, reference):
    metrics = launch_two_ranks(tmp_path, batches, "0,2,3", KW)
    for stage in ("0", "2", "3"):
        weights = torch.load(tmp_path / f"weights_{stage}.pt")
        _assert_same((metrics[stage], weights), reference)
        assert metrics[stage][0]["train_tokens"] == batches[0].num_tokens  # the whole batch's, not a shard's


def test_a_user_config_is_used_and_a_bad_one_is_named(tokenizer, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}, "wall_clock_breakdown": False,
                                "train_micro_batch_size_per_gpu": KW["micro_batch_size"]}))  # fmt: skip
    learner = DeepSpeedLearner(_model(tokenizer), make_loss_fn(), zero_stage=2, ds_config=user, **KW)
    assert learner.ds_config["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert learner.engine.zero_optimization_stage() == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON .*line 1"):
        DeepSpeedLearner(_model(tokenizer), make_loss_fn(), ds_config=bad, **KW)
    for conflict, key in (
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
        ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ):
        user.write_text(json.dumps(conflict))
        with pytest.raises(ValueError, match=rf"ds\.json: '{key}'"):
            DeepSpeedLearner(_model(tokenizer), make_loss_fn(), zero_stage=2, ds_config=user, **KW)


@pytest.mark.parametrize("stage", [0, 3])
def test_save_and_load_continue_the_run(tokenizer, batches, tmp_path, stage):
    from transformers import AutoModelForCausalLM

    a = DeepSpeedLearner(_model(tokenizer), make_loss_fn(), zero_stage=stage, **KW)
    for b in batches[:2]:
        a.step(_copy(b))
    a.save(str(tmp_path / "ckpt"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for k, v in a.weights_for_generation().items():
        torch.testing.assert_close(saved.state_dict()[k], v.cpu(), rtol=0, atol=0, msg=k)
    b_ = DeepSpeedLearner(build_tiny_model(tokenizer, seed=123, **TEST_SIZE.__dict__), make_loss_fn(), zero_stage=stage,
                          **KW)  # fmt: skip
    b_.load(str(tmp_path / "ckpt"))
    assert b_.version == 2
    rest_a = _run(a, batches[2:])
    rest_b = _run(b_, batches[2:])
    _assert_same(rest_b, rest_a, exact=stage == 0)
