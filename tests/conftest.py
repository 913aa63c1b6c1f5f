"""Fixtures shared by several test files: the sandbox isolation levels that work on this machine,
and the tiny random model with a dense-reward environment the pipeline tests train on."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rlvr.trainer.algorithm.losses import Objective, make_loss_fn
from rlvr.trainer.algorithm.rollout import Episode
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.models import TEST_SIZE, build_tiny_model, build_tokenizer
from rlvr.verifiers.sandbox import ISOLATION_LEVELS, SandboxError, run_in_sandbox

ENV_SOURCE = '''
from rlvr.envs.arithmetic import ArithmeticEnv
from rlvr.verifiers.types import Verdict


class LengthEnv(ArithmeticEnv):
    """Arithmetic prompts, reward = completion length / 40: dense, so a random model has gradients."""

    def verify(self, completion, task):
        return Verdict(score=min(1.0, len(completion) / 40), reason="length")


class FailingEnv(LengthEnv):
    """Raises inside the generator (process or actor) on its third episode."""

    def verify(self, completion, task):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls >= 3:
            raise RuntimeError("verifier exploded on purpose")
        return super().verify(completion, task)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny random model folder (``tiny/``) and the env file above (``envs.py``: LengthEnv, FailingEnv)."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "envs.py").write_text(ENV_SOURCE)
    return root


# Popen(env=HANG_DUMP_ENV): Python's faulthandler prints every thread's stack on SIGABRT.
HANG_DUMP_ENV = {**os.environ, "PYTHONFAULTHANDLER": "1"}


def interrupt_and_wait(proc: subprocess.Popen, bound: float) -> tuple[str, float]:
    """Send SIGINT to ``proc`` (started with ``env=HANG_DUMP_ENV``); return its stderr and the seconds to exit.

    A process still running after ``bound`` seconds fails the test with every thread's stack
    (SIGABRT through faulthandler), so that a hang seen once in a long CI run says where it was.
    """
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"no exit within {bound} s of SIGINT; its threads then:\n{stderr[-12000:]}")
    return stderr, time.monotonic() - sent


def saved_on_stop(out: Path, stderr: str) -> tuple[str, int]:
    """Check that a run stopped by a signal saved the step it ended on (``interrupt.py``); return signal and step.

    train.py says which step and where; that checkpoint must be whole (its manifest written
    last) and be the run's last logged step.
    """
    match = re.search(r"interrupted \((SIG\w+)\) after step (\d+); saved to (\S+); continue with --resume auto", stderr)
    assert match, stderr[-3000:]
    name, step, saved = match.group(1), int(match.group(2)), Path(match.group(3))
    assert saved == out / "checkpoints" / f"step_{step:06d}" and (saved / "manifest.json").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if line.strip()] == list(range(1, step + 1))
    return name, step


def tiny_config(assets: Path, out: Path, **overrides) -> TrainConfig:
    """A few-step run of the tiny model on LengthEnv (``assets``), every loop's test setting; ``overrides`` win."""
    values = {
        "env": f"{assets / 'envs.py'}:LengthEnv",
        "model": str(assets / "tiny"),
        "output_dir": str(out),
        "max_steps": 3,
        "group_size": 4,
        "prompts_per_step": 2,
        "max_new_tokens": 8,
        "learning_rate": 1e-3,
        "torch_threads": 1,
        "progress": False,
    }
    return TrainConfig(**(values | overrides))


def tiny_model(tokenizer, seed: int = 0, attn: str | None = None) -> torch.nn.Module:
    """The suite's tiny random Qwen2 (``TEST_SIZE``), with attention implementation ``attn`` if given."""
    model = build_tiny_model(tokenizer, seed=seed, **TEST_SIZE.__dict__)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def learner_objective(beta: float, entropy_coef: float, objective: str, aggregation: str = "token") -> Objective:
    """Both losses of ``objective`` (on-policy and stale) as a learner takes them, for the path-equality tests."""

    def loss(on_policy: bool):
        return make_loss_fn(
            objective=objective, beta=beta, entropy_coef=entropy_coef, aggregation=aggregation, on_policy=on_policy
        )

    return Objective(stale=loss(False), on_policy=loss(True), needs_entropy=entropy_coef > 0)


def free_port() -> int:
    """A TCP port nobody listens on now (for a launcher's rendezvous or a Ray head)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DS_WORKER = Path(__file__).with_name("ds_rank_worker.py")


def launch_two_ranks(tmp_path: Path, batches: list, stages: str, kwargs: dict, *extra: str) -> dict[str, list[dict]]:
    """Run ``ds_rank_worker.py`` on two ranks under torchrun, every ZeRO stage in ``stages`` in one launch.

    Returns its metrics by stage; its weights are in ``tmp_path / f"weights_{stage}.pt"``.
    """
    torch.save(batches, tmp_path / "batches.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(DS_WORKER), "--batches", str(tmp_path / "batches.pt"), "--out", str(tmp_path), "--stages", stages,
           "--kwargs", json.dumps(kwargs), *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "metrics.json").read_text())


def _mask_blind(module, query, key, value, attention_mask, **kwargs):
    """sdpa that ignores the attention mask (plain causal, bottom-right aligned).

    Right-padded rows alone are fine with it; packed rows leak into each other, and a shared
    prefix's padding is attended to. The packing and shared-prefix probes must catch it.
    """
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


MASK_BLIND_ATTENTION = "rlvr_test_mask_blind"
"""A model's ``attn_implementation`` that ignores masks (``_mask_blind``), for the fallback tests."""
AttentionInterface.register(MASK_BLIND_ATTENTION, _mask_blind)


def ragged_episode(rng: torch.Generator, vocab: int, group: int, prompt: int, turns: list[tuple[int, int]]) -> Episode:
    """A prompt of ``prompt`` tokens, then per turn ``(model tokens, env tokens)``: masks 0/1/0/1...

    Random ids (3 and up: not pad or EOS) and behaviour log-probabilities, for the learner tests
    that compare two ways of computing the same loss on ragged multi-turn batches.
    """
    ids = lambda n: torch.randint(3, vocab, (n,), generator=rng).tolist()  # noqa: E731 (3+: not pad/eos)
    tokens, mask, logprobs, turn_ids = [], [], [], []
    for k, (model_n, env_n) in enumerate(turns):
        tokens += ids(model_n) + ids(env_n)
        mask += [1] * model_n + [0] * env_n
        logprobs += (-torch.rand(model_n, generator=rng) * 3).tolist() + [0.0] * env_n
        turn_ids += [k] * (model_n + env_n)
    return Episode(
        group=group, task_id=str(group), prompt_ids=ids(prompt), token_ids=tokens, loss_mask=mask,
        logprobs=logprobs, turn_ids=turn_ids, turn_rewards=[0.0] * len(turns),
        completions=[""] * len(turns), versions=[0] * len(turns),
    )  # fmt: skip


def _unavailable(level: str) -> str | None:
    """Return None if sandbox isolation ``level`` works here, else the reason it does not."""
    try:
        run_in_sandbox("", ["assert True"], mode="asserts", isolation=level)
    except SandboxError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.fixture(scope="module", params=ISOLATION_LEVELS)
def level(request):
    """Each sandbox isolation level in turn; skipped with the reason where it does not work."""
    reason = _unavailable(request.param)
    if reason is not None:
        pytest.skip(f"{request.param} unavailable: {reason}")
    return request.param


@pytest.fixture(scope="module")
def namespaces_level():
    """The 'namespaces' level, or a skip where it does not work here."""
    if _unavailable("namespaces") is not None:
        pytest.skip("namespaces level unavailable here")
    return "namespaces"
