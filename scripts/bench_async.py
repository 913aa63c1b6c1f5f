#!/usr/bin/env python
"""Synchronous vs asynchronous GRPO on the same work: wall times, speed-up, idle fractions.

    python scripts/bench_async.py                       # eta = 0, 1, 2, 4; 24 steps each
    python scripts/bench_async.py --steps 40 --etas 1 --hidden-size 192 --max-new-tokens 24

Every run trains the same tiny random-weight Qwen2 (built here, saved to a temporary
folder) on ``arithmetic`` with the same seed, steps, prompts and group size: the same
tasks, the same number of groups, the same generation budget. A random model almost never
emits EOS, so every completion is exactly ``--max-new-tokens`` long and every step does
the same amount of work in every run; its rewards are 0, so the weights barely move, but
the learner still runs its full forward and backward passes on every batch (timing is
what is measured here, not learning). The model size is chosen so that generating a
batch and learning from it take about the same time: two equal stages overlapped cannot
run more than 2x faster than one after the other.

Runs and their threads (``--torch-threads``):

- ``sync, 1 thread``: the synchronous loop on one core (``torch_threads=1``);
- ``sync, 2 threads``: the synchronous loop with both cores for torch's intra-op
  parallelism (``torch_threads=2``): the same hardware as the pipeline;
- ``async, eta=k``: the two-process pipeline with ``torch_threads=2``, i.e. one thread,
  one core, per role;
- ``sync, vllm, 1 thr`` and ``async vllm, eta=k``: the same with ``--generator vllm`` (vLLM's
  engine in-process, in the learner process or in the generator process; weights sent to
  it after every step), when vLLM is installed (``--vllm-etas`` with no value: none).
- ``ray N gen store|bcast, eta=k``: ``--cluster ray`` on a local Ray (``cluster/loop.py``):
  N generator actors of one thread each and the learner in the driver (one thread),
  rollouts through Ray's object store instead of shared memory, and the weights by the
  route ``--ray-weight-sync`` names: ``store`` (one ``ray.put`` per version, a ``ray.get``
  per actor) or ``bcast`` (a gloo broadcast from the driver to the actors,
  ``weights/broadcast.py``); ``--ray-generators`` with no value: no Ray rows. With two
  generators three one-thread roles share two cores.

The time compared is the steady state: the wall time of steps ``--warmup + 1 .. steps``
as the learner sees them (``time/step`` summed), which leaves out process start, model
loading and the first batches (the generator's head start is at most ``eta + 1`` batches
of ``steps``). The whole-run wall time, start included, is printed too. Idle fractions
over the same steps: the learner's time waiting for batches over its wall time, and the
generator's time waiting for admissible weights over its own wall time.

Measured on the 2-vCPU development VM, otherwise idle (1-minute load 0.9-1.3 during
the runs, the bench's own processes included), with the defaults: sync 1 thread 0.431
s/step, sync 2 threads 0.288, async eta=0 0.440, eta=1 0.228, eta=2 0.230, eta=4 0.228:
1.89x the 1-thread loop and 1.26x the 2-thread loop at eta=1; learner idle 0.00,
generator idle 0.20 (eta=1) to 0.04 (eta=4).

Measured again after the pipeline moved to a fixed lag, with the Ray rows, in one
invocation on the idle VM (load 0.7-1.3; ``--etas 0 1 2 --vllm-etas --ray-generators 1 2``):
sync 1 thread 0.411 s/step, sync 2 threads 0.300, async eta=0 0.409, eta=1 0.230 (1.79x),
eta=2 0.224 (1.84x, staleness exactly 2.00); ray 1 generator 0.407 (1.01x), ray 2
generators 0.337 (1.22x), learner idle 0.39 and 0.27 against 0.00 for the shared-memory
pipeline. Moving the weights per step (``weights ms``: publish + receive, the slowest
actor's receive for Ray) costs 4.8 ms through shared memory, 19.1 ms through Ray's object
store with one generator and 64.8 ms with two, for the 3.7 MB model: a ``ray.put`` of the
pickled state dict, and each actor's ``ray.get`` and copy into its model. The Ray rows
also pay a ``ray.get`` per shard and the actors' scheduling, which is what the learner
waits on here; on this model the object store is the cost of crossing machines, not a
speed-up on one.

With the weight routes side by side (``--etas 1 --vllm-etas --no-sync-2 --ray-generators
1 2``, idle VM, load 0.5-1.2): sync 1 thread 0.406 s/step, async eta=1 0.240 (weights 4.8
ms); ray 1 generator: object store 0.411 s/step (weights 18.8 ms), broadcast 0.376 (15.4
ms); 2 generators: object store 0.354 (74.8 ms), broadcast 0.368 (28.0 ms). The gloo
broadcast moves the weights 1.2x faster to one actor and 2.7x faster to two (one send
however many actors, no pickling); the step times differ by less than the runs' noise,
as the learner's idle time is Ray's scheduling, not the weights.

Timings on a shared machine are meaningless: the script samples the 1-minute load
average every second during each run and prints its mean and max per run (the bench
itself puts about 1 on it, 2 for the pipeline); run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlvr.trainer.bookkeeping.metrics import read_metrics
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import installed
from rlvr.trainer.engines.models import build_tiny_model, build_tokenizer
from rlvr.trainer.pipeline.loop import train_async
from rlvr.trainer.sync_loop import train


@dataclass
class Run:
    """One training run's timings."""

    name: str
    wall: float
    """Whole ``train`` call, setup and process start included."""
    steady: float
    """Sum of ``time/step`` over the steps after the warm-up."""
    generation: float
    """Mean seconds per batch spent sampling and in the envs."""
    learning: float
    """Mean seconds per step inside ``learner.step``."""
    learner_idle: float = float("nan")
    generator_idle: float = float("nan")
    staleness: float = float("nan")
    weights_ms: float = float("nan")
    """Mean milliseconds per step moving weights: the sync loop's update, or publish + receive of a pipeline."""
    load_mean: float = float("nan")
    """Mean of the 1-minute load average sampled during the run."""
    load_max: float = float("nan")


class _LoadSampler:
    """Samples ``os.getloadavg()[0]`` once a second in a daemon thread."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> _LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _measure(name: str, config: TrainConfig, warmup: int) -> Run:
    start = time.perf_counter()
    with _LoadSampler() as load:
        result = _loop(config)(config)
    wall = time.perf_counter() - start
    steady = [r for r in read_metrics(result.metrics_path) if r["step"] > warmup]
    run = Run(
        name=name,
        wall=wall,
        steady=sum(r["time/step"] for r in steady),
        generation=statistics.fmean(r["time/generation"] + r["time/reward"] for r in steady),
        learning=statistics.fmean(r["time/learning"] for r in steady),
        load_mean=statistics.fmean(load.samples) if load.samples else float("nan"),
        load_max=max(load.samples, default=float("nan")),
    )
    if config.max_staleness is not None:
        run.learner_idle = sum(r["time/wait_rollouts"] for r in steady) / run.steady
        gen_wall = sum(r["time/generator_wait"] + r["time/weight_receive"] + r["time/generator_busy"] for r in steady)
        run.generator_idle = sum(r["time/generator_wait"] for r in steady) / gen_wall
        run.staleness = statistics.fmean(r["staleness_mean"] for r in steady)
        run.weights_ms = 1e3 * statistics.fmean(r["time/weight_publish"] + r["time/weight_receive"] for r in steady)
    elif "time/weight_sync" in steady[0]:
        run.weights_ms = 1e3 * statistics.fmean(r["time/weight_sync"] for r in steady)
    return run


def _loop(config: TrainConfig):
    """The training function of ``config``: synchronous, the two-process pipeline, or Ray (imported only then)."""
    if config.cluster == "ray":
        from rlvr.trainer.cluster.loop import train_ray

        return train_ray
    return train if config.max_staleness is None else train_async


def _model(folder: Path, args: argparse.Namespace) -> str:
    tokenizer = build_tokenizer()
    size = {
        "hidden_size": args.hidden_size,
        "intermediate_size": 3 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    build_tiny_model(tokenizer, seed=0, **size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the steady-state time")
    parser.add_argument("--etas", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--no-sync-2", action="store_true", help="skip the 2-thread synchronous run")
    parser.add_argument(
        "--vllm-etas",
        type=int,
        nargs="*",
        default=[1],
        help="the vLLM generator's rows: the sync loop and async at these etas (none: no vLLM rows)",
    )
    parser.add_argument(
        "--ray-generators",
        type=int,
        nargs="*",
        default=[1, 2],
        help="the Ray rows (--cluster ray, a local Ray): one per number of generator actors, at --ray-eta",
    )
    parser.add_argument("--ray-eta", type=int, default=1)
    parser.add_argument(
        "--ray-weight-sync",
        nargs="+",
        default=["object-store", "broadcast"],
        choices=["object-store", "broadcast"],
        help="the weight routes of the Ray rows (--weight-sync): one row per route and number of generators",
    )
    args = parser.parse_args(argv)

    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), cpus: {os.cpu_count()}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        model = _model(Path(tmp) / "model", args)
        base = {
            "env": "arithmetic",
            "model": model,
            "max_steps": args.steps,
            "group_size": args.group_size,
            "prompts_per_step": args.prompts_per_step,
            "max_new_tokens": args.max_new_tokens,
            "learning_rate": 1e-4,
            "seed": 0,
            "progress": False,
        }

        def config(name: str, **kw) -> TrainConfig:
            return TrainConfig(**base, output_dir=str(Path(tmp) / name.replace(" ", "_")), **kw)

        runs.append(_measure("sync, 1 thread", config("sync1", torch_threads=1), args.warmup))
        if not args.no_sync_2:
            runs.append(_measure("sync, 2 threads", config("sync2", torch_threads=2), args.warmup))
        for eta in args.etas:
            runs.append(
                _measure(f"async, eta={eta}", config(f"async{eta}", torch_threads=2, max_staleness=eta), args.warmup)
            )
        if args.vllm_etas and not installed("vllm"):
            print("vllm is not installed: no vLLM rows")
        elif args.vllm_etas:
            # One thread, as the baseline row: the generator-only difference.
            runs.append(_measure("sync, vllm, 1 thr", config("syncv", torch_threads=1, generator="vllm"), args.warmup))
            for eta in args.vllm_etas:
                vllm_eta = config(f"asyncv{eta}", torch_threads=2, max_staleness=eta, generator="vllm")
                runs.append(_measure(f"async vllm, eta={eta}", vllm_eta, args.warmup))
        if args.ray_generators and not installed("ray"):
            print("ray is not installed: no Ray rows")
        for n in args.ray_generators if installed("ray") else []:
            for sync in args.ray_weight_sync:
                ray_n = config(f"ray{n}{sync}", torch_threads=2, max_staleness=args.ray_eta, cluster="ray",
                               num_generators=n, weight_sync=sync)  # fmt: skip
                runs.append(_measure(f"ray {n} gen {_SHORT[sync]}, eta={args.ray_eta}", ray_n, args.warmup))
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    _report(runs, args)
    return 0


_SHORT = {"object-store": "store", "broadcast": "bcast"}


def _report(runs: list[Run], args: argparse.Namespace) -> None:
    base = runs[0]
    steady_steps = args.steps - args.warmup
    print(
        f"\nmodel: hidden {args.hidden_size}, {args.layers} layers; {args.prompts_per_step} prompts x "
        f"{args.group_size} = {args.prompts_per_step * args.group_size} episodes of {args.max_new_tokens} tokens "
        f"per step; steady state = steps {args.warmup + 1}..{args.steps}"
    )
    print(f"sync 1 thread stages per step: generation {base.generation:.3f} s, learning {base.learning:.3f} s\n")
    header = (
        f"{'run':<24}{'wall s':>8}{'steady s':>10}{'s/step':>8}{'speed-up':>10}"
        f"{'vs sync2':>10}{'learner idle':>14}{'gen idle':>10}{'staleness':>11}{'weights ms':>11}{'load mean/max':>15}"
    )
    print(header)
    print("-" * len(header))
    sync2 = next((r for r in runs if r.name == "sync, 2 threads"), None)
    for r in runs:
        vs2 = f"{sync2.steady / r.steady:>10.2f}" if sync2 else f"{'-':>10}"
        sync = r.learner_idle != r.learner_idle  # NaN: no pipeline
        idle = f"{'-':>14}{'-':>10}{'-':>11}" if sync else f"{r.learner_idle:>14.2f}{r.generator_idle:>10.2f}"
        stale = "" if sync else f"{r.staleness:>11.2f}"
        print(
            f"{r.name:<24}{r.wall:>8.1f}{r.steady:>10.2f}{r.steady / steady_steps:>8.3f}"
            f"{base.steady / r.steady:>10.2f}{vs2}{idle}{stale}{r.weights_ms:>11.1f}"
            f"{r.load_mean:>9.2f}/{r.load_max:.2f}"
        )
    print("\nspeed-up = steady time of 'sync, 1 thread' / steady time of the run; 'vs sync2' likewise.")
    print("weights ms = per step: the sync loop's weight update; a pipeline's publish + receive (Ray: slowest actor).")


if __name__ == "__main__":
    sys.exit(main())
