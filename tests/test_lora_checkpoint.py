"""A LoRA run's checkpoints: peft's format, loadable as users expect, merged on request, resumed exactly.

The kill/resume comparison reuses ``test_kill_resume``'s helpers (a ``train.py`` subprocess
SIGKILLed between checkpoints, resumed with ``--resume auto``, every metric but timings equal).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from test_kill_resume import ENV, ROOT, _cmd, _comparable, _kill_after_step, _records

from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.bookkeeping.evaluation import evaluate
from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.config import ConfigError
from rlvr.trainer.engines import lora
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.sync_loop import train


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """The final checkpoint of a 3-step LoRA run on the tiny model (adapters trained away from B = 0)."""
    out = tmp_path_factory.mktemp("lora_run")
    return train(tiny_config(assets, out, lora_rank=4, lora_alpha=16.0, learning_rate=3e-2)).checkpoint


def _scores(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode("What is 12+7? 19 and 3*4=12")])
    with torch.no_grad():
        return sequence_logprobs(model, ids, torch.ones_like(ids))


def _rlvr_view(assets, folder):
    """The adapters as rlvr itself loads them on resume: the base model, apply_lora, load_adapters."""
    model = load_model(str(assets / "tiny"))[0]
    lora.apply_lora(model, lora.LoraSettings.of(_Cfg()))
    lora.load_adapters(model, folder)
    return model


class _Cfg:  # the default target modules, as TrainConfig spells them
    lora_rank, lora_alpha, lora_dropout = 4, 16.0, 0.0
    lora_target_modules = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def test_the_checkpoint_loads_in_peft_and_transformers_as_users_expect(assets, trained):
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, tokenizer = load_model(str(assets / "tiny"))
    want = _scores(_rlvr_view(assets, trained), tokenizer)
    assert (want - _scores(base, tokenizer)).abs().max() > 1e-3  # the adapters learned something
    loaded = {
        "PeftModel.from_pretrained": PeftModel.from_pretrained(load_model(str(assets / "tiny"))[0], str(trained)),
        "AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained(str(trained)),
        "load_model (evaluate.py --model)": load_model(str(trained))[0],
    }
    for how, model in loaded.items():
        module = model.get_base_model() if isinstance(model, PeftModel) else model  # adapters injected in place
        assert torch.allclose(_scores(module.eval(), tokenizer), want, atol=1e-6), how


def test_evaluate_takes_the_checkpoint_as_its_model(trained):
    result = evaluate("arithmetic", model=str(trained), limit=3, progress=False, generator_kind="transformers")
    assert len(result.tasks) == 3 and "reward_mean" in result.summary()


def test_merge_lora_writes_a_plain_model_with_the_same_numbers(assets, trained, tmp_path):
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), str(trained), str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and not (out / lora.ADAPTER_CONFIG).exists()
    merged, tokenizer = load_model(str(out))
    assert not any("lora" in name for name in merged.state_dict())
    assert torch.allclose(_scores(merged, tokenizer), _scores(_rlvr_view(assets, trained), tokenizer), atol=1e-5)
    refused = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora.py"), str(out), str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)  # fmt: skip
    assert refused.returncode == 2 and "not a LoRA checkpoint" in refused.stderr


def test_training_on_from_the_checkpoint_trains_every_weight_of_the_merged_model(assets, trained, tmp_path):
    """``--model FOLDER`` without ``--lora-rank``: the merged model is the policy and the reference."""
    base, merged = load_model(str(assets / "tiny"))[0].state_dict(), load_model(str(trained))[0].state_dict()
    run = train(tiny_config(assets, tmp_path / "on", model=str(trained), beta=0.04, max_steps=1, learning_rate=1e-3))
    (record,) = read_metrics(run.metrics_path)
    assert record["kl"] == 0.0 and record["grad_norm"] > 0  # the reference is the policy it starts from: merged
    on = load_model(str(run.checkpoint))[0].state_dict()
    assert set(on) == set(merged) and not any("lora" in name for name in on)  # a plain model
    moved = max(float((on[k] - merged[k]).abs().max()) for k in merged)  # one AdamW step: ~lr per weight
    adapters = max(float((merged[k] - base[k]).abs().max()) for k in merged)
    assert 0 < moved <= 1.5e-3 < adapters, (moved, adapters)
    with pytest.raises(ConfigError, match="LoRA checkpoint"):
        tiny_config(assets, tmp_path / "x", model=str(trained), lora_rank=4)  # new adapters on a merged model


LORA = ["--lora-rank", "4", "--lora-alpha", "16", "--learning-rate", "3e-3"]


@pytest.mark.parametrize("extra", [LORA, [*LORA, "--max-staleness", "1"]], ids=["sync", "async-eta1"])
def test_a_lora_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, extra):
    whole = subprocess.run(_cmd(tmp_path / "whole", *extra), capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=ENV)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    _kill_after_step(killed, 3, extra)
    step2 = killed / "checkpoints" / "step_000002"
    assert (step2 / lora.ADAPTER_WEIGHTS).is_file() and not (step2 / "model.safetensors").exists()
    resumed = subprocess.run(_cmd(killed, "--resume", "auto", *extra), capture_output=True, text=True, timeout=300,
                             cwd=ROOT, env=ENV)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _records(tmp_path / "whole"), _records(killed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert any(r["grad_norm"] > 0 for r in want)
    for a, b in zip(want, got):
        assert _comparable(a) == _comparable(b), a["step"]
    final = "checkpoints/step_000005/" + lora.ADAPTER_WEIGHTS
    assert (tmp_path / "whole" / final).read_bytes() == (killed / final).read_bytes()
