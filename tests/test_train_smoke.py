"""scripts/train.py end to end, in subprocesses, on the default model: run, resume, YAML, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlvr.trainer.config import TrainConfig, config_yaml
from rlvr.trainer.flags import config_from_args
from rlvr.trainer.run import TrainResult

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
# Small enough to finish in seconds on two CPU cores, large enough to be a real GRPO step.
SMALL = ["--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "16", "--no-progress"]


def _train(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


METRIC_KEYS = (
    "reward_mean", "reward_std", "components/correctness_mean", "zero_spread_fraction", "kl",
    "clip_low_fraction", "clip_high_fraction", "entropy", "completion_length_mean", "completion_length_max",
    "truncated_fraction", "grad_norm", "learning_rate", "time/generation", "time/reward", "time/learning",
    "tokens_per_second",
)  # fmt: skip


@pytest.mark.slow
def test_the_default_command_finishes_and_writes_two_metrics_lines(tmp_path):
    """The issue's command as is, defaults and all: `train.py --env gsm8k --max-steps 2`."""
    proc = _train("--env", "gsm8k", "--max-steps", "2", "--output-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(METRIC_KEYS) <= set(r), set(METRIC_KEYS) - set(r)
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert r["learning_rate"] == TrainConfig().learning_rate
        assert r["train_sequences"] <= TrainConfig().group_size * TrainConfig().prompts_per_step
    assert "grpo: 100%" in proc.stderr  # the progress bar ran to the end


@pytest.fixture(scope="module")
def two_steps_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gsm8k")
    proc = _train("--env", "gsm8k", "--max-steps", "2", "--output-dir", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def two_steps(two_steps_run) -> Path:
    return two_steps_run[0]


def test_the_run_writes_its_resolved_config_at_start(two_steps_run):
    out, _ = two_steps_run
    flags = ["--env", "gsm8k", "--max-steps", "2", "--output-dir", str(out), *SMALL]
    assert (out / "config.yaml").read_text() == config_yaml(config_from_args(flags))
    assert TrainConfig(**yaml.safe_load((out / "config.yaml").read_text())) == config_from_args(flags)


def test_the_end_of_run_summary_says_where_things_are_and_why_gsm8k_stays_at_zero(two_steps_run):
    out, proc = two_steps_run
    assert "done: 2 steps in " in proc.stdout
    assert "reward_mean 0.000 (first 2 steps) -> 0.000 (last 2)" in proc.stdout
    assert f"metrics      {out / 'metrics.jsonl'}" in proc.stdout
    assert f"final model  {out / 'checkpoints' / 'step_000002'}" in proc.stdout
    assert "cannot solve gsm8k" in proc.stdout and "--env arithmetic" in proc.stdout and "--model" in proc.stdout
    # the run drew its curves on the way out, and says where they are
    assert f"plots        {out / 'plots'}" in proc.stdout
    assert (out / "plots" / "reward.png").stat().st_size > 10_000
    assert f"tensorboard  tensorboard --logdir {out}" in proc.stdout


def test_two_small_steps_write_metrics_and_a_checkpoint(two_steps):
    records = _records(two_steps)
    assert [r["step"] for r in records] == [1, 2]
    assert all(set(METRIC_KEYS) <= set(r) for r in records)
    checkpoint = two_steps / "checkpoints" / "step_000002"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "learner_state.pt", "rng_state.pt",
                 "trainer_state.json", "config.yaml"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["group_size"] == 2


def test_resume_continues_from_the_checkpoint(two_steps):
    proc = _train("--env", "gsm8k", "--max-steps", "3", "--output-dir", str(two_steps), "--resume", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _records(two_steps)] == [1, 2, 3]
    step3 = two_steps / "checkpoints" / "step_000003"
    assert json.loads((step3 / "trainer_state.json").read_text())["step"] == 3
    # The optimizer came back with the weights: AdamW's step count went on from 2 to 3.
    state = torch.load(step3 / "learner_state.pt", weights_only=False)
    assert state["optimizer"]["state"][0]["step"] == 3 and state["version"] == 3


def test_yaml_config_with_a_command_line_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "env: arithmetic\nenv-kwargs: {digits: 1}\nmax_steps: 5\ngroup_size: 3\nprompts_per_step: 2\n"
        "max_new_tokens: 8\nlearning_rate: 1.0e-4\nprogress: false\n"
    )
    out = tmp_path / "out"
    proc = _train("--config", str(config), "--max-steps", "1", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _records(out)  # --max-steps 1 beat the file's 5
    assert record["train_sequences"] <= 6 and record["learning_rate"] == pytest.approx(1e-4)
    assert record["completion_length_max"] <= 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group-size", "1"], "group_size must be >= 2"),
        (["--aggregation", "mean"], "invalid choice: 'mean'"),
        (["--learning-rate", "fast"], "invalid float value: 'fast'"),
        (["--env-kwargs", "{digits: 2}"], "not valid JSON"),
        (["--temperature", "0"], "temperature must be > 0"),
    ],
    ids=["group-size-1", "unknown-aggregation", "non-numeric-lr", "bad-json", "zero-temperature"],
)
def test_bad_flag_values_give_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_print_config_prints_defaults_file_and_flags_as_yaml_and_exits(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("env: arithmetic\nmax_steps: 5\ngroup_size: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--config", str(config), "--max-steps", "7", "--print-config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == TrainConfig(env="arithmetic", max_steps=7, group_size=3).to_dict()
    assert list(printed) == [f.name for f in TrainConfig.__dataclass_fields__.values()]  # declaration order


def _summary_lines():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summary_lines


@pytest.mark.parametrize(
    "env, model, rewards, note",
    [
        ("gsm8k", None, [0.0, 0.0, 0.0], True),
        ("gsm8k", None, [0.1, 0.3, 0.5], False),
        ("gsm8k", "Qwen/Qwen2.5-0.5B", [0.0, 0.0], False),
        ("arithmetic", None, [0.0, 0.0], False),
    ],
    ids=["default-model-at-zero", "default-model-learning", "real-model-at-zero", "arithmetic-at-zero"],
)
def test_summary_explains_a_zero_reward_only_on_the_default_model(tmp_path, env, model, rewards, note):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(
        json.dumps({"step": i + 1, "reward_mean": r, "time/step": 2.0, "generated_tokens": 100.0}) + "\n"
        for i, r in enumerate(rewards)
    ))  # fmt: skip
    config = TrainConfig(env=env, model=model, output_dir=str(tmp_path))
    result = TrainResult(len(rewards), metrics, tmp_path / "checkpoints" / "step_000003", {})
    text = "\n".join(_summary_lines()(config, result, 6.5))
    assert f"done: {len(rewards)} steps in 6.5 s" in text and "50 generated tokens/s" in text
    assert ("cannot solve" in text) is note


def test_bad_yaml_key_names_the_closest_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max_step: 3\n")
    with pytest.raises(SystemExit):
        config_from_args(["--config", str(config)])
    assert "unknown field 'max_step'; did you mean 'max_steps'?" in capsys.readouterr().err


def test_bad_flag_in_a_subprocess_exits_2_before_loading_anything():
    proc = _train("--env", "gsm8k", "--beta", "-1", timeout=60)
    assert proc.returncode == 2
    assert "beta must be >= 0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = _train("--env", "gsm8k", "--output-dir", str(tmp_path), "--resume", timeout=60)
    assert proc.returncode == 2
    assert "no checkpoint under" in proc.stderr and "Traceback" not in proc.stderr
