"""The two-process pipeline end to end: eta = 0 is the synchronous loop, stale metrics, failures.

Real processes throughout: the generator is a spawned child with its own model, signals are
real signals, ``scripts/train.py`` runs as a subprocess. Most runs use a tiny random Qwen2
with a dense reward (completion length) so that every step has a gradient in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import HANG_DUMP_ENV, interrupt_and_wait, saved_on_stop, tiny_config
from safetensors.torch import load_file

from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.pipeline.loop import train_async
from rlvr.trainer.protocols import GeneratorError
from rlvr.trainer.sync_loop import train

ROOT = Path(__file__).resolve().parents[1]
_config = tiny_config


REWARD_KEYS = ("reward_mean", "reward_std", "zero_spread_fraction", "completion_length_mean", "loss", "grad_norm")


@pytest.mark.parametrize("setup", ["tiny-random-length-reward", "default-model-arithmetic"])
@pytest.mark.parametrize("objective", ["decoupled", "plain"])
def test_staleness_zero_reproduces_the_synchronous_loop(assets, tmp_path, setup, objective):
    # One thread in both: the synchronous loop's torch_threads=1, and 1 // 2 -> 1 per process.
    extra = {} if setup.startswith("tiny") else {"env": "arithmetic", "model": None, "learning_rate": 1e-3}
    sync = train(_config(assets, tmp_path / "sync", **extra))
    fresh = train_async(_config(assets, tmp_path / "async", max_staleness=0, objective=objective, **extra))
    sync_records, async_records = read_metrics(sync.metrics_path), read_metrics(fresh.metrics_path)
    assert [r["step"] for r in async_records] == [1, 2, 3]
    for s, a in zip(sync_records, async_records):
        assert {k: a[k] for k in REWARD_KEYS} == {k: s[k] for k in REWARD_KEYS}, s["step"]
        assert a["staleness_max"] == 0.0 and a["staleness_hist_0"] == 1.0
    assert any(r["grad_norm"] > 0 for r in sync_records)  # the runs did learn something
    want, got = load_file(sync.checkpoint / "model.safetensors"), load_file(fresh.checkpoint / "model.safetensors")
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # bitwise


def test_resume_continues_the_pipeline_exactly(assets, tmp_path):
    # eta = 0 is deterministic, so a run stopped at step 2 and resumed to 4 must end where
    # an uninterrupted 4-step run ends: weights, optimizer state and RNG all came back.
    whole = train_async(_config(assets, tmp_path / "whole", max_steps=4, max_staleness=0))
    train_async(_config(assets, tmp_path / "parts", max_steps=2, max_staleness=0))
    resumed = train_async(_config(assets, tmp_path / "parts", max_steps=4, max_staleness=0, resume="latest"))
    assert [r["step"] for r in read_metrics(resumed.metrics_path)] == [1, 2, 3, 4]
    want, got = load_file(whole.checkpoint / "model.safetensors"), load_file(resumed.checkpoint / "model.safetensors")
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    assert read_metrics(resumed.metrics_path)[-1]["reward_mean"] == read_metrics(whole.metrics_path)[-1]["reward_mean"]


def test_stale_batches_are_logged_and_weighted(assets, tmp_path):
    result = train_async(_config(assets, tmp_path, max_steps=6, max_staleness=2))
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert 0 <= r["staleness_max"] <= 2
        hist = [r[f"staleness_hist_{k}"] for k in range(3)]
        assert sum(hist) == pytest.approx(1.0)
        assert 0.0 <= r["async/learner_idle_fraction"] <= 1.0 and 0.0 <= r["async/generator_idle_fraction"] <= 1.0
        assert r["time/weight_publish"] > 0 and r["time/weight_receive"] >= 0
        for key in ("is_weight_mean", "is_weight_max", "is_weight_min", "is_capped_fraction", "behavior_kl"):
            assert key in r, key
    # The generator starts batch s + 1 as soon as batch s is sent, before the learner can
    # have learned from batch s: from step 2 on every batch is at least one step stale.
    assert all(r["staleness_mean"] >= 1 for r in records[1:])
    assert records[0]["staleness_max"] == 0
    # stale samples of a policy that moved: pi_prox / mu departs from 1, and it is measured
    assert max(r["is_weight_max"] - r["is_weight_min"] for r in records[1:]) > 1e-4
    assert max(r["behavior_abs_log_diff"] for r in records[1:]) > 1e-5


def _descendants(pid: int) -> list[int]:
    """Pids of every live process under ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def _generator_pid(parent: int) -> int | None:
    for pid in _descendants(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return pid
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _kill_generator_after(metrics: Path, lines: int) -> threading.Thread:
    """In the background: once ``metrics`` has ``lines`` lines, SIGKILL this process's generator child."""

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
                pid = _generator_pid(os.getpid())
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_generator_stops_the_run_with_the_last_step_checkpointed(assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=500, max_staleness=1, checkpoint_every=1000)
    watcher = _kill_generator_after(tmp_path / "metrics.jsonl", lines=2)
    with pytest.raises(GeneratorError, match="died without reporting an error: killed by signal SIGKILL") as info:
        train_async(config)
    watcher.join()
    assert info.value.exitcode == -signal.SIGKILL and not info.value.reported
    records = read_metrics(tmp_path / "metrics.jsonl")
    last = records[-1]["step"]
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == [f"step_{last:06d}"]  # complete, no half-written .tmp
    saved = tmp_path / "checkpoints" / checkpoints[0]
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == last
    assert load_file(saved / "model.safetensors")  # readable weights
    assert not [p for p in _descendants(os.getpid()) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_a_killed_generator_is_restarted_when_allowed(assets, tmp_path):
    config = _config(assets, tmp_path / "restarted", max_steps=8, max_staleness=1, generator_restarts=1)
    watcher = _kill_generator_after(tmp_path / "restarted" / "metrics.jsonl", lines=2)
    result = train_async(config)
    watcher.join()
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[-1]["async/generator_restarts"] == 1.0
    # The replacement starts from the lagging weights the dead one would have used (fixed lag):
    # the run is the uninterrupted one, step for step.
    whole = read_metrics(train_async(_config(assets, tmp_path / "whole", max_steps=8, max_staleness=1)).metrics_path)
    keys = ("reward_mean", "loss", "grad_norm", "policy_version", "staleness_mean")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in whole]


def test_an_env_error_in_the_generator_surfaces_in_the_trainer(assets, tmp_path):
    start = time.monotonic()
    config = _config(assets, tmp_path, env=f"{assets / 'envs.py'}:FailingEnv", max_steps=10, max_staleness=1)
    with pytest.raises(GeneratorError, match="RuntimeError: verifier exploded on purpose") as info:
        train_async(config)
    assert info.value.reported and "in verify" in info.value.remote_traceback
    assert time.monotonic() - start < 60  # an error, not a hang


def test_sigint_stops_train_py_and_both_processes_within_seconds(assets, tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--env", f"{assets / 'envs.py'}:LengthEnv",
        "--model", str(assets / "tiny"), "--max-staleness", "1", "--max-steps", "100000", "--group-size", "4",
        "--prompts-per-step", "2", "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=HANG_DUMP_ENV
    )
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step finished in 120 s"
            time.sleep(0.1)
        children = _descendants(proc.pid)
        assert _generator_pid(proc.pid) in children
        stderr, took = interrupt_and_wait(proc, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert saved_on_stop(out, stderr)[0] == "SIGINT"  # the step in progress ended and was saved
    assert took < 30  # no hang: 1.5 s on an idle 2-core VM, longer on a loaded CI machine
    time.sleep(0.5)  # the resource tracker exits on EOF once its parent is gone
    assert [p for p in children if _alive(p)] == []


def test_train_py_on_gsm8k_with_max_staleness_2(tmp_path):
    """The issue's command on the default model and the bundled GSM8K sample, shortened."""
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "train.py"), "--env", "gsm8k", "--max-staleness", "2",
            "--max-steps", "3", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "16",
            "--output-dir", str(tmp_path), "--no-progress",
        ],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("components/correctness_mean" in r and r["staleness_max"] <= 2 for r in records)
    assert (tmp_path / "checkpoints" / "step_000003" / "model.safetensors").is_file()


def _hold_forever(lock) -> None:
    lock.acquire()
    time.sleep(600)


def test_a_generator_that_dies_holding_the_weight_lock_is_reported_as_its_death(assets, tmp_path, monkeypatch):
    """The generator takes the transport's lock to read weights; killed then, the learner's publish

    must not fail with a lock timeout: the death is the error (or a restart, with a fresh transport).
    """
    from rlvr.trainer.engines.build import build_learner
    from rlvr.trainer.engines.models import load_model
    from rlvr.trainer.pipeline.loop import _Pipeline
    from rlvr.trainer.weights import shared_memory as weight_transport

    config = tiny_config(assets, tmp_path, max_staleness=1)
    model, _ = load_model(config.model)
    learner = build_learner(config, model, torch.device("cpu"))
    pipeline = _Pipeline(config, learner, start=0, lagged={})
    try:
        holder = pipeline.ctx.Process(target=_hold_forever, args=(pipeline.transport._lock,), daemon=True)
        holder.start()
        while pipeline.transport._lock.acquire(timeout=0.01):  # until the holder has it
            pipeline.transport._lock.release()
            time.sleep(0.01)
        os.kill(pipeline.process.pid, signal.SIGKILL)  # the generator dies (here the lock is the holder's)
        pipeline.process.process.join(10)
        sent = time.monotonic()
        pipeline.publish(learner)  # no TransportError: the generator is dead, its death is the error
        assert time.monotonic() - sent < weight_transport._LOCK_TIMEOUT / 2  # its death ended the wait, not the timeout
        with pytest.raises(GeneratorError, match="died without reporting an error: killed by signal SIGKILL"):
            for step in range(1, 4):  # batches it sent before it died come first (at most eta + 1 = 2)
                pipeline.take(step, learner)
        holder.kill()
        # A live generator and a lock nobody frees: that stays an error (nothing to blame but the lock).
        monkeypatch.setattr(weight_transport, "_LOCK_TIMEOUT", 1.0)
        other = pipeline.ctx.Process(target=_hold_forever, args=(pipeline.transport._lock,), daemon=True)
        monkeypatch.setattr(pipeline.process, "alive", lambda: True)
        other.start()
        time.sleep(0.5)
        with pytest.raises(weight_transport.TransportError, match="lock not free"):
            pipeline.publish(learner)
        other.kill()
    finally:
        pipeline.close()
