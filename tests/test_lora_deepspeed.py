"""LoRA with the DeepSpeed learner at ZeRO 0-3: the torch learner's LoRA trajectory, adapters only.

Same set-up as ``test_deepspeed_learner`` (its batches, tolerances and helpers), with adapters
on every projection, the KL to the reference (the model with its adapters off) in the loss,
and the same adapter initialisation on both sides (seeded before ``apply_lora``).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import launch_two_ranks
from test_deepspeed_learner import KW, STEPS, _assert_same, _copy, _model, _run, batches  # noqa: F401
from test_deepspeed_learner import tokenizer as tokenizer  # noqa: F401 - a fixture

from rlvr.trainer.algorithm.losses import make_loss_fn
from rlvr.trainer.engines import lora
from rlvr.trainer.engines.deepspeed_learner import DeepSpeedLearner
from rlvr.trainer.engines.torch_learner import TorchLearner

pytestmark = pytest.mark.deepspeed

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = lora.LoraSettings(4, 16.0, 0.0, TARGETS)
LORA_KW = KW  # the same learning rate, clipping (it bites: norms 0.5-0.9 against 0.5) and micro-batches


def _adapted(tokenizer):  # noqa: F811
    model = _model(tokenizer)
    torch.manual_seed(7)  # the adapters' A
    lora.apply_lora(model, SETTINGS)
    return model


def _loss():
    return make_loss_fn(beta=0.04)


@pytest.fixture(scope="module")
def lora_reference(tokenizer, batches):  # noqa: F811
    model = _adapted(tokenizer)
    metrics, weights = _run(TorchLearner(model, _loss(), ref_model=lora.AdaptersOff(model), **LORA_KW), batches)
    assert metrics[-1]["kl"] > 0, "the reference never differed from the policy"
    assert set(weights) == set(lora.adapter_names(model))
    return metrics, weights


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_follows_the_torch_learners_trajectory_at_every_zero_stage(tokenizer, batches, lora_reference, stage):  # noqa: F811
    model = _adapted(tokenizer)
    learner = DeepSpeedLearner(model, _loss(), ref_model=lora.AdaptersOff(model), zero_stage=stage, **LORA_KW)
    # The optimizer holds the adapters only (ZeRO 1-3 hold them as flat fp32 partitions, padded for alignment).
    held = sum(p.numel() for group in learner.engine.basic_optimizer.param_groups for p in group["params"])
    adapters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter_key(n))
    assert adapters <= held <= adapters + 64, (held, adapters)
    got = _run(learner, batches)
    _assert_same(got, lora_reference, exact=stage == 0)
    assert learner.version == STEPS


@pytest.mark.parametrize("stage", [0, 3])
def test_lora_save_and_load_continue_the_run(tokenizer, batches, tmp_path, stage):  # noqa: F811
    def learner():
        model = _adapted(tokenizer)
        return DeepSpeedLearner(model, _loss(), ref_model=lora.AdaptersOff(model), zero_stage=stage, **LORA_KW)

    a = learner()
    for b in batches[:2]:
        a.step(_copy(b))
    a.save(str(tmp_path / "ckpt"))
    saved = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert lora.ADAPTER_WEIGHTS in saved and "model.safetensors" not in saved
    b_ = learner()
    b_.load(str(tmp_path / "ckpt"))
    assert b_.version == 2
    _assert_same(_run(b_, batches[2:]), _run(a, batches[2:]), exact=stage == 0)


def test_two_processes_follow_the_torch_learners_lora_trajectory(tmp_path, batches, lora_reference):  # noqa: F811
    """Adapters only, the reference with adapters off, on two ranks at ZeRO 2 and 3 (one launch)."""
    settings = {"rank": SETTINGS.rank, "alpha": SETTINGS.alpha, "targets": list(TARGETS), "seed": 7}
    metrics = launch_two_ranks(tmp_path, batches, "2,3", LORA_KW, "--beta", "0.04", "--lora", json.dumps(settings))
    for stage in ("2", "3"):
        weights = torch.load(tmp_path / f"weights_{stage}.pt")
        assert set(weights) == set(lora_reference[1])  # the adapters, and nothing else, are sent
        _assert_same((metrics[stage], weights), lora_reference)
