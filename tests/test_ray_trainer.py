"""The Ray pipeline end to end: eta = 0 is the synchronous loop, shards, killed actors, no process left.

Real Ray throughout: a local Ray started once for the in-process tests (2 logical CPUs, a
200 MB object store, no dashboard) and shut down after them; ``scripts/train.py`` in
subprocesses starts and stops its own. Actors are killed with ``ray.kill``, as an operator
or a failing node would. Most runs use a tiny random Qwen2 with a dense reward
(completion length) so that every step has a gradient in seconds.
"""

from __future__ import annotations

import importlib.util
import os
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
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.sync_loop import train

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rlvr[ray]')")

from test_ray_cluster import alive, process_tree  # noqa: E402 - a sibling: pytest puts tests/ on sys.path

from rlvr.trainer.cluster import ray_runtime as ray_cluster  # noqa: E402 - after the skip: it needs Ray
from rlvr.trainer.cluster.generator_actors import RayGeneratorError  # noqa: E402
from rlvr.trainer.cluster.learner_actors import RayLearnerError  # noqa: E402
from rlvr.trainer.cluster.loop import train_ray  # noqa: E402
from rlvr.trainer.step import shard_groups, shard_seed  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

REWARD_KEYS = ("reward_mean", "reward_std", "zero_spread_fraction", "completion_length_mean", "loss", "grad_norm")


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the in-process tests; train_ray uses it and leaves it running.

    Three logical CPUs: room for two learner ranks and a generator (Ray's CPUs are a count
    of slots, not cores: the machine may have two).
    """
    ray.init("local", num_cpus=3, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _config(assets: Path, out: Path, **overrides) -> TrainConfig:
    return tiny_config(assets, out, **({"cluster": "ray", "max_staleness": 0} | overrides))


def _named_actors() -> list[str]:
    return list(ray.util.list_named_actors())


def test_shards_cover_every_group_once_and_group_0_keeps_the_sync_seed():
    assert shard_groups(5, 2) == [range(0, 3), range(3, 5)]
    assert [g for s in shard_groups(16, 3) for g in s] == list(range(16))
    with pytest.raises(ValueError, match="cannot split 2 groups over 3 generators"):
        shard_groups(2, 3)
    assert shard_seed(7, 3, 0) == 7 * 1_000_003 + 3  # grpo.step_seed: one shard samples as the sync loop
    assert shard_seed(7, 3, 2) != shard_seed(7, 3, 0)


def test_staleness_zero_one_generator_reproduces_the_synchronous_loop(local_ray, assets, tmp_path):
    sync_config = _config(assets, tmp_path / "sync", cluster=None, max_staleness=None)
    sync = train(sync_config)
    fresh = train_ray(_config(assets, tmp_path / "ray"))
    sync_records, ray_records = read_metrics(sync.metrics_path), read_metrics(fresh.metrics_path)
    assert [r["step"] for r in ray_records] == [1, 2, 3]
    for s, a in zip(sync_records, ray_records):
        assert {k: a[k] for k in REWARD_KEYS} == {k: s[k] for k in REWARD_KEYS}, s["step"]
        assert a["staleness_max"] == 0.0 and a["ray/num_generators"] == 1.0
    assert any(r["grad_norm"] > 0 for r in sync_records)  # the runs did learn something
    want, got = load_file(sync.checkpoint / "model.safetensors"), load_file(fresh.checkpoint / "model.safetensors")
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())  # bitwise
    assert _named_actors() == []  # the run's actors are gone, the caller's Ray is not
    assert ray.is_initialized()


@pytest.fixture(scope="module")
def two_generators(local_ray, assets, tmp_path_factory) -> list[dict]:
    """An uninterrupted run: 2 generators, eta = 1, 6 steps of 4 groups; the kill tests compare with it."""
    out = tmp_path_factory.mktemp("ray_reference")
    result = train_ray(_config(assets, out, max_steps=6, prompts_per_step=4, num_generators=2, max_staleness=1))
    return read_metrics(result.metrics_path)


def test_two_generators_share_each_step_at_a_fixed_lag(two_generators):
    records = two_generators
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["ray/num_generators"] == 2.0 for r in records)
    # Step s is sampled by version max(0, s - 2), whatever the timing: staleness exactly 1 from step 2 on.
    assert [r["policy_version"] for r in records] == [0.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert records[0]["staleness_max"] == 0.0
    assert all(r["staleness_mean"] == 1.0 and r["staleness_hist_1"] == 1.0 for r in records[1:])
    assert all("is_weight_mean" in r and r["time/weight_publish"] > 0 for r in records)


def test_a_resumed_run_samples_what_the_uninterrupted_one_did(two_generators, assets, tmp_path):
    # The checkpoint of step 3 carries version 2 (step 4 is sampled by it at eta = 1).
    config = _config(assets, tmp_path, max_steps=3, prompts_per_step=4, num_generators=2, max_staleness=1)
    train_ray(config)
    assert (tmp_path / "checkpoints" / "step_000003" / "lagged_weights").is_dir()
    resumed = train_ray(_config(assets, tmp_path, max_steps=6, prompts_per_step=4, num_generators=2,
                                max_staleness=1, resume="latest"))  # fmt: skip
    records = read_metrics(resumed.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    for want, got in zip(two_generators, records):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]


def test_eval_every_evaluates_in_the_driver(local_ray, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=2, max_staleness=1, eval_every=1, eval_limit=4)
    records = read_metrics(train_ray(config).metrics_path)
    assert all(0.0 <= r["eval/pass@1"] <= 1.0 and "eval/reward_mean" in r for r in records)


def _kill_after(metrics: Path, lines: int, name: str) -> threading.Thread:
    """In the background: once ``metrics`` has ``lines`` lines, ``ray.kill`` the actor called ``name``."""

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
                ray.kill(ray.get_actor(name))
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_generator_is_replaced_and_its_groups_regenerated(two_generators, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=6, prompts_per_step=4, num_generators=2, max_staleness=1,
                     generator_restarts=1)  # fmt: skip
    watcher = _kill_after(tmp_path / "metrics.jsonl", 1, "rlvr-generator-1")  # 5 steps still to go
    result = train_ray(config)
    watcher.join()
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["async/generator_restarts"] == 1.0  # the kill happened, and was survived
    # The replacement played the same shards with the same weights and seeds: nothing differs.
    for want, got in zip(two_generators, records):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]
    assert _named_actors() == []


def test_a_killed_generator_without_restarts_stops_the_run_naming_it(local_ray, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=500, prompts_per_step=4, num_generators=2, max_staleness=1)
    watcher = _kill_after(tmp_path / "metrics.jsonl", 2, "rlvr-generator-1")
    start = time.monotonic()
    with pytest.raises(RayGeneratorError, match=r"generator actor rlvr-generator-1 \(pid \d+ on .*node .*\) died") as e:
        train_ray(config)
    watcher.join()
    assert "ray.kill" in str(e.value)  # Ray's cause, as Ray words it
    assert e.value.place is not None and e.value.place.name == "rlvr-generator-1"
    assert time.monotonic() - start < 120  # an error, not a hang
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]["step"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{last:06d}"]
    assert _named_actors() == []


def test_an_env_error_in_an_actor_surfaces_with_its_traceback(local_ray, assets, tmp_path):
    config = _config(assets, tmp_path, env=f"{assets / 'envs.py'}:FailingEnv", max_steps=10, generator_restarts=3)
    with pytest.raises(RayGeneratorError, match="RuntimeError: verifier exploded on purpose") as e:
        train_ray(config)
    assert e.value.reported and "in verify" in e.value.remote_traceback  # raised, so never restarted
    assert _named_actors() == []


def test_a_cluster_too_small_for_the_generators_is_an_error_not_a_wait(local_ray, assets, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cluster, "PLACEMENT_TIMEOUT", 3.0)
    config = _config(assets, tmp_path, prompts_per_step=4, num_generators=4)
    with pytest.raises(ray_cluster.EngineError, match=r"cannot place the generator actors \(4 x \{'CPU': 1.0\}\)"):
        train_ray(config)
    assert _named_actors() == []


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
@pytest.mark.parametrize("weight_sync", ["object-store", "broadcast"])
def test_generator_actors_run_vllm_engines(tmp_path, weight_sync):
    """Two actors, each with its own vLLM engine (the CPU build here), taking new weights in place.

    With the broadcast route the actors are threaded (weights arrive beside ``play``): the
    in-process engine must work from the sampling thread all the same.
    """
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--env", "arithmetic", "--cluster", "ray",
            "--generator", "vllm", "--num-generators", "2", "--max-staleness", "1", "--max-steps", "3",
            "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8", "--output-dir", str(out),
            "--no-progress", "--weight-sync", weight_sync]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "generator: vllm (requested), in 2 Ray actor(s)" in proc.stderr
    assert f"weights reach the generators by {weight_sync}" in proc.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["time/weight_receive"] > 0  # version 1 reached the engines for step 3


# --- scripts/train.py: the flags, and what a run leaves behind ------------------------------------


def _train_args(assets: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--env", f"{assets / 'envs.py'}:LengthEnv",
        "--model", str(assets / "tiny"), "--cluster", "ray", "--group-size", "4", "--prompts-per-step", "2",
        "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_sigint_stops_train_py_and_every_ray_process_within_seconds(assets, tmp_path):
    out = tmp_path / "run"
    args = _train_args(assets, out, "--num-generators", "2", "--max-staleness", "1", "--max-steps", "100000")
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=HANG_DUMP_ENV
    )
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step finished in 180 s"
            time.sleep(0.1)
        children = process_tree(proc.pid)[1:]
        assert len(children) >= 4  # Ray's own processes and the two actors
        stderr, took = interrupt_and_wait(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert saved_on_stop(out, stderr)[0] == "SIGINT"  # the step in progress ended and was saved
    assert took < 60  # no hang (a few seconds idle; a loaded CI machine is slower)
    deadline = time.monotonic() + 10
    while [p for p in children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in children if alive(p)] == []


def test_train_py_without_the_flag_never_imports_ray(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', '--env', 'arithmetic', '--max-steps', '1', '--group-size', '2',"
        f" '--prompts-per-step', '2', '--max-new-tokens', '4', '--no-progress', '--output-dir', {str(tmp_path)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "import rlvr.trainer.pipeline.loop, rlvr.trainer.sync_loop, rlvr.trainer.config\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray imported: False" in proc.stdout
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["step"] == 1  # it did train


def test_cluster_ray_without_ray_installed_says_what_to_install(assets, tmp_path):
    # sys.modules['ray'] = None is how Python spells "not importable": find_spec and import both fail.
    code = (
        "import runpy, sys\n"
        "sys.modules['ray'] = None\n"
        f"sys.argv = {_train_args(assets, tmp_path, '--max-steps', '1')[1:]!r}\n"
        f"runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--cluster ray needs Ray: `pip install 'rlvr[ray]'`" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-generators", "2"], "num_generators needs --cluster ray"),
        (["--ray-address", "auto"], "ray_address needs --cluster ray"),
        (["--cluster", "ray", "--num-generators", "3", "--prompts-per-step", "2"], "must be <= prompts_per_step"),
        (["--cluster", "slurm"], "invalid choice: 'slurm'"),
        (["--cluster", "ray", "--learner-ranks", "2"], "learner_ranks needs --cluster ray and --learner deepspeed"),
        (["--cluster", "ray", "--learner", "deepspeed", "--learner-ranks", "3"], "must divide the 32 episodes"),
        (["--weight-sync", "broadcast"], "weight_sync needs --cluster ray"),
        (["--cluster", "ray", "--weight-sync", "nccl"], "invalid choice: 'nccl'"),
    ],
)
def test_bad_cluster_flags_are_usage_errors(flags, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *flags, "--print-config"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# --- the learner as a group of rank actors (DeepSpeed data parallel over gloo) ---------------------


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_two_deepspeed_rank_actors_learn_the_synchronous_first_step_and_resume(assets, tmp_path):
    """2 learner rank actors at ZeRO-2 + 1 generator at eta 0: step 1 is the synchronous loop's step 1."""
    sync = tmp_path / "sync"
    args = _train_args(assets, sync, "--max-steps", "1", "--torch-threads", "1")
    proc = subprocess.run([a for a in args if a not in ("--cluster", "ray")], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ranks"
    flags = ["--learner", "deepspeed", "--zero-stage", "2", "--learner-ranks", "2", "--max-staleness", "0",
             "--checkpoint-every", "1", "--torch-threads", "1"]  # fmt: skip
    proc = subprocess.run(_train_args(assets, out, *flags, "--max-steps", "2"), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "2 learner ranks ready, process group at" in proc.stderr
    a, b = read_metrics(sync / "metrics.jsonl")[0], read_metrics(out / "metrics.jsonl")[0]
    assert a["reward_mean"] == b["reward_mean"] and a["generated_tokens"] == b["generated_tokens"]
    for key in ("loss", "grad_norm", "policy_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert b["train_sequences"] == 8  # the whole batch's count: both shards were learned
    assert (out / "checkpoints" / "step_000002" / "deepspeed").is_dir()  # every rank wrote its part
    proc = subprocess.run(_train_args(assets, out, *flags, "--max-steps", "3", "--resume"), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_killed_learner_rank_stops_the_run_naming_it(local_ray, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=500, learner="deepspeed", learner_ranks=2, max_staleness=1)
    watcher = _kill_after(tmp_path / "metrics.jsonl", 2, "rlvr-learner-1")
    start = time.monotonic()
    with pytest.raises(RayLearnerError, match=r"learner rank rlvr-learner-1 \(pid \d+ on .*\) died in \w+") as e:
        train_ray(config)
    watcher.join()
    assert "ray.kill" in str(e.value)
    assert time.monotonic() - start < 120  # rank 0, left alone in a collective, did not hold the run
    assert _named_actors() == []


# --- the broadcast route (--weight-sync broadcast: a gloo weight group here, NCCL on GPUs) ---


def test_the_broadcast_route_samples_what_the_object_store_route_did(two_generators, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=6, prompts_per_step=4, num_generators=2, max_staleness=1,
                     weight_sync="broadcast")  # fmt: skip
    records = read_metrics(train_ray(config).metrics_path)
    assert [r["policy_version"] for r in records] == [r["policy_version"] for r in two_generators]
    # The same versions reached the same actors bit for bit: every metric of every step is equal.
    for want, got in zip(two_generators, records):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]
    assert _named_actors() == []


def test_broadcast_route_a_killed_generator_is_replaced_and_the_group_rebuilt(two_generators, assets, tmp_path):
    config = _config(assets, tmp_path, max_steps=6, prompts_per_step=4, num_generators=2, max_staleness=1,
                     generator_restarts=1, weight_sync="broadcast")  # fmt: skip
    watcher = _kill_after(tmp_path / "metrics.jsonl", 1, "rlvr-generator-0")
    result = train_ray(config)
    watcher.join()
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["async/generator_restarts"] == 1.0
    # The rebuilt group sent the replacement every version its re-sent steps sample with.
    for want, got in zip(two_generators, records):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]
    assert _named_actors() == []


def test_broadcast_route_resumes_with_the_lagged_versions(two_generators, assets, tmp_path):
    common = dict(prompts_per_step=4, num_generators=2, max_staleness=1, weight_sync="broadcast")
    train_ray(_config(assets, tmp_path, max_steps=3, **common))
    assert (tmp_path / "checkpoints" / "step_000003" / "lagged_weights").is_dir()
    records = read_metrics(train_ray(_config(assets, tmp_path, max_steps=6, resume="latest", **common)).metrics_path)
    for want, got in zip(two_generators, records):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]


@pytest.mark.deepspeed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_broadcast_route_from_rank_0_of_a_zero3_rank_group_matches_the_object_store(local_ray, assets, tmp_path):
    """Two ZeRO-3 rank actors (gathering the weights is collective) and rank 0 broadcasting to the generator."""
    common = dict(max_steps=3, learner="deepspeed", zero_stage=3, learner_ranks=2, max_staleness=1)
    runs = {
        sync: read_metrics(train_ray(_config(assets, tmp_path / sync, weight_sync=sync, **common)).metrics_path)
        for sync in ("object-store", "broadcast")
    }
    assert [r["policy_version"] for r in runs["broadcast"]] == [0.0, 0.0, 1.0]
    for want, got in zip(runs["object-store"], runs["broadcast"]):
        assert {k: got[k] for k in REWARD_KEYS} == {k: want[k] for k in REWARD_KEYS}, want["step"]
    # The checkpoint's lagged version came from rank 0's held copies.
    version_2 = Path("checkpoints", "step_000003", "lagged_weights", "version_000002.safetensors")
    lagged, want = (load_file(tmp_path / sync / version_2) for sync in ("broadcast", "object-store"))
    assert lagged.keys() == want.keys() and all(torch.equal(lagged[k], want[k]) for k in want)
    assert _named_actors() == []
