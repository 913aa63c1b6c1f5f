"""LoRA (``--lora-rank``, engines/lora.py): only the adapters train, the reference is the base model
with no second copy loaded, the generator samples with the adapters, and checkpoints are peft's.

Real peft on a real tiny Qwen2 throughout. Adapters start with B = 0 (the model is the base
model); tests that need adapters that change the model either train a step or fill B with
random numbers (``_perturb``).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.config import ConfigError, TrainConfig
from rlvr.trainer.engines import lora
from rlvr.trainer.engines.build import build_generator, build_learner, choose_generator, prepare_generator
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import SamplingParams
from rlvr.trainer.sync_loop import train

CPU = torch.device("cpu")
TARGETS = lora.LoraSettings(4, 8.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter a nonzero B, so the adapted model differs from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode("What is 12+7? 19"), tokenizer.encode("3*4=12 and 5")]
    width = max(map(len, rows))
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("lora_rank", -1, "lora_rank must be >= 0"),
        ("lora_alpha", 0.0, "lora_alpha must be > 0"),
        ("lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
        ("lora_target_modules", "q_proj,,v_proj", "comma-separated module names"),
        ("lora_target_modules", "q_proj;rm -rf", "comma-separated module names"),
    ],
)
def test_lora_fields_are_validated_with_clear_messages(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(**{field: value, "lora_rank": 4} if field != "lora_rank" else {field: value})


def test_lora_off_by_default_changes_nothing():
    config = TrainConfig()
    assert config.lora_rank == 0 and lora.LoraSettings.of(config) is None
    model = load_model(None)[0]
    learner = build_learner(config, model, CPU)
    assert not lora.is_lora(model)
    assert set(learner.weights_for_generation()) == set(model.state_dict())


def test_only_the_adapters_train_with_the_torch_learner(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4, lora_alpha=8.0)
    model = load_model(config.model)[0]
    learner = build_learner(config, model, CPU)
    trained = {id(p) for group in learner.optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if lora.is_adapter_key(n)}
    assert trained == adapters and len(adapters) == 2 * 7 * model.config.num_hidden_layers
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not lora.is_adapter_key(n)]
    assert frozen == []
    published = learner.weights_for_generation()
    assert set(published) == set(lora.adapter_names(model))  # the adapters only
    full = sum(v.numel() for v in model.state_dict().values())
    assert sum(v.numel() for v in published.values()) < 0.2 * full


def test_unknown_target_module_names_the_flag(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4, lora_target_modules="q_proj,not_a_layer")
    with pytest.raises(ValueError, match="--lora-target-modules"):
        build_learner(config, load_model(config.model)[0], CPU)


def test_reference_with_adapters_off_equals_a_separately_loaded_base_model(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4, beta=0.04)
    model, tokenizer = load_model(config.model)
    learner = build_learner(config, model, CPU)
    assert isinstance(learner.ref_model, lora.AdaptersOff)  # no second model loaded
    _perturb(model)
    ids, mask = _batch(tokenizer)
    base = load_model(config.model)[0]
    with torch.no_grad():
        want = sequence_logprobs(base, ids, mask)
        got = sequence_logprobs(learner.ref_model, ids, mask)
        policy = sequence_logprobs(model, ids, mask)
    assert torch.equal(got, want)  # bit for bit: the base layers run alone
    assert (policy - want).abs().max() > 1e-2  # and the adapters do change the policy
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, ids, mask), policy)  # switched back on afterwards


def test_a_generator_sharing_the_learners_model_samples_with_the_adapters(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4)
    model, tokenizer = load_model(config.model)
    build_learner(config, model, CPU)
    _perturb(model)
    generator = build_generator(choose_generator("transformers", CPU), config.model, tokenizer, CPU, model=model)
    prompt = _batch(tokenizer)[0][0].tolist()
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    sampled = generator.generate([prompt], 2, params)[0]
    for completion in sampled:
        ids = torch.tensor([completion.prompt_ids + completion.token_ids])
        with torch.no_grad():
            want = sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
            with lora.adapters_disabled(model):
                base = sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
        assert torch.allclose(torch.tensor(completion.logprobs), want, atol=1e-5)
        assert (torch.tensor(completion.logprobs) - base).abs().max() > 1e-3


def test_a_generator_with_its_own_copy_takes_the_adapters_in_place(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4, generator="transformers")
    model, tokenizer = load_model(config.model)
    learner = build_learner(config, model, CPU)
    _perturb(model)
    generator = TransformersGenerator(load_model(config.model)[0], tokenizer, seed=0)
    prepare_generator(generator, config, CPU)
    generator.update_weights(learner.weights_for_generation(), 7)
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(generator.model, ids, mask), sequence_logprobs(model, ids, mask))
    assert generator.version == 7
    with pytest.raises(KeyError, match="missing"):  # a partial adapter set is refused, not half-loaded
        generator.update_weights(dict(list(learner.weights_for_generation().items())[1:]), 8)


def test_a_lora_run_learns_with_the_sync_loop_and_saves_peft_adapters(assets, tmp_path):
    config = tiny_config(assets, tmp_path, lora_rank=4, lora_alpha=16.0, beta=0.04, learning_rate=1e-2)
    result = train(config)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0  # the reference is the untrained base model
    assert all(r["grad_norm"] > 0 for r in records)
    files = {p.name for p in result.checkpoint.iterdir()}
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS} <= files and "model.safetensors" not in files
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())["files"]
    assert lora.ADAPTER_WEIGHTS in manifest and lora.ADAPTER_CONFIG in manifest
    saved = json.loads((result.checkpoint / lora.ADAPTER_CONFIG).read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 16.0
