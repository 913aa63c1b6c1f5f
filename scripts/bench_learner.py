#!/usr/bin/env python
"""The learner's step: every position, only the scored tokens, and shared prompts, side by side.

    python scripts/bench_learner.py                              # issue 23's workload, beta 0 and 0.04
    python scripts/bench_learner.py --micro-batch-sizes 16 32 128 --sort-by-length

The workload is issue 23's: ``--env arithmetic --prompts-per-step 16`` with group size 8 on
the default model (``trainer/engines/default_model``), every other setting ``TrainConfig``'s
default. Rollouts are collected once (``--batches`` steps of the synchronous loop's
``Player``, all sampled by the initial weights, so every batch is on-policy); then, for
each ``--betas`` value and micro-batch size, each batch is learned ``--repeats`` times by
each path, rotating which goes first, every time from the same weights and a fresh
optimizer. The paths are switches of ``torch_learner``:

- ``full`` (``LEAN_LOGITS`` and ``SHARE_PREFIX`` off): the LM head, log-softmax and entropy
  at every real position, recomputed in backward, every row's prompt run in full: the
  code before issue 23, for the policy and the reference passes;
- ``lean`` (``LEAN_LOGITS`` on): the head only on the target tokens the loss scores;
- ``shared`` (both on, the default): also each group's prompt through the model body once
  per micro-batch, the rows continuing from its cached keys and values
  (``algorithm/shared_prefix.py``).

The table gives the median seconds of ``learner.step`` per path, the ratios full / lean
and full / shared, every path's gradient norm (means over the batches) and the median
peak resident set of a step (``memory/peak_rss_gb``, GB). The paths must agree: the
script exits 1 where a loss or gradient norm differs from the full path's by more than
float rounding, or where full / shared misses ``--target`` on the first micro-batch size.
With one iteration the loss is the surrogate at ratio 1, whatever the log-probabilities
(and the KL is 0: the reference starts as the policy), so it is the gradient norm that
tells paths apart. ``--sort-by-length`` adds rows where the batch's rows are sorted by
length before the step (the loss is a sum over rows, so it does not change). On a shared
machine the numbers are noisy: run it more than once. One torch thread by default: with
two threads on two cores that other processes share, torch's thread pool waits on its
busy peers and a step takes 5-10x longer, by chance more for one path than the other.

Measured on the idle 2-vCPU development VM, two invocations (the second with
``--micro-batch-sizes 16 32 64``), equal gradient norms on every path throughout::

    beta  micro  full s  lean s  shared s  full/lean  full/shared
    0       16   0.501   0.395   0.230     1.27x      2.17x
    0.04    16   0.642   0.534   0.316     1.20x      2.03x
    0       16   0.500   0.398   0.220     1.25x      2.27x
    0       32   0.493   0.387   0.172     1.28x      2.86x
    0       64   0.520   0.376   0.154     1.38x      3.37x
    0.04    16   0.653   0.561   0.329     1.16x      1.99x
    0.04    32   0.641   0.508   0.227     1.26x      2.83x
    0.04    64   0.606   0.448   0.178     1.35x      3.40x

9% of the targets are scored and 27 of a row's 30 tokens are prompt. The head on scored
targets alone gives 1.16-1.27x at 16 rows (the rest of a step is the model body, which
that change leaves alone); sharing the prompts cuts the body's tokens about 4x (a group
of 8 runs 26 prompt tokens once and 8 x ~4 after them, instead of 8 x 30), which gives
2.0-2.3x at 16 rows, more with larger micro-batches (more rows per prompt, fewer calls).
Peak resident set: 0.52-0.53 GB (shared) against 0.54 GB (full) at 16 rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from rlvr.trainer.algorithm.advantages import make_estimator, turn_advantages
from rlvr.trainer.algorithm.batch import TrainBatch, pack_episodes
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines import torch_learner
from rlvr.trainer.engines.build import build_objective, setup_process
from rlvr.trainer.engines.models import load_model
from rlvr.trainer.engines.torch_learner import TorchLearner
from rlvr.trainer.step import Player

PATHS = {"full": (False, False), "lean": (True, False), "shared": (True, True)}
"""Path -> (``torch_learner.LEAN_LOGITS``, ``torch_learner.SHARE_PREFIX``)."""


def collect(config: TrainConfig, model: torch.nn.Module, batches: int) -> list[TrainBatch]:
    """Play ``batches`` steps with the model's current weights and pack them as ``step.Learning`` does."""
    player = Player.build(config, torch.device("cpu"), model=model, threads=config.torch_threads)
    estimator = make_estimator(config.advantage_estimator, config.scale)
    packed = []
    for step in range(1, batches + 1):  # steps count from 1, as in the loops
        rollouts = player.play(step)
        advantages = turn_advantages([[e.turn_rewards for e in g] for g in rollouts.groups], estimator)
        flat = [a for g in advantages for a in g]
        packed.append(pack_episodes(rollouts.episodes, flat, player.tokenizer.pad_token_id, config.mask_truncated))
    return packed


def sort_by_length(batch: TrainBatch) -> TrainBatch:
    """The same rows, shortest first: each micro-batch then pads only to rows of like length."""
    order = batch.attention_mask.sum(-1).argsort(stable=True)
    rows = {
        f.name: getattr(batch, f.name)[order]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **rows)


def learn_once(
    config: TrainConfig, model, ref_model, start: dict, batch: TrainBatch, path: tuple[bool, bool]
) -> dict[str, float]:
    """One ``learner.step`` from the weights ``start`` with a fresh optimizer; its metrics and ``seconds``."""
    model.load_state_dict(start)
    torch_learner.LEAN_LOGITS, torch_learner.SHARE_PREFIX = path
    learner = TorchLearner(
        model,
        build_objective(config),
        learning_rate=config.learning_rate,
        ref_model=ref_model,
        max_grad_norm=config.max_grad_norm,
        num_iterations=config.num_iterations,
        micro_batch_size=config.micro_batch_size,
        temperature=config.temperature,
    )
    begin = time.perf_counter()
    metrics = learner.step(dataclasses.replace(batch), on_policy=True)
    return {**metrics, "seconds": time.perf_counter() - begin}


def measure(config: TrainConfig, model, batches: list[TrainBatch], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Every batch ``repeats`` times per path, alternating which path goes first."""
    ref_model = load_model(config.model)[0] if config.beta > 0 else None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    keys = ("seconds", "loss", "grad_norm", "memory/peak_rss_gb")
    runs: dict[str, dict[str, list[float]]] = {p: {k: [] for k in keys} for p in PATHS}
    for path in PATHS.values():  # warm-up: allocator, thread pool, the shared-prefix probe
        learn_once(config, model, ref_model, start, batches[0], path)
    for r in range(repeats):
        for batch in batches:
            order = list(PATHS)[r % len(PATHS) :] + list(PATHS)[: r % len(PATHS)]  # rotate who goes first
            for path in order:
                metrics = learn_once(config, model, ref_model, start, batch, PATHS[path])
                for key in runs[path]:
                    runs[path][key].append(float(metrics[key]))
    model.load_state_dict(start)
    torch_learner.LEAN_LOGITS = torch_learner.SHARE_PREFIX = True
    return runs


def agree(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-5 + 1e-4 * abs(y) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04])
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--sort-by-length", action="store_true", help="also time each batch sorted by length")
    parser.add_argument("--num-iterations", type=int, default=1, help=">1 adds the proximal (old log-prob) pass")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="1: stable timings on a shared machine")
    parser.add_argument("--target", type=float, default=1.2)
    args = parser.parse_args(argv)

    base = TrainConfig(
        env="arithmetic",
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        num_iterations=args.num_iterations,
        torch_threads=args.torch_threads,
        progress=False,
    )
    setup_process(base, base.torch_threads)
    model, _ = load_model(base.model)
    batches = collect(base, model, args.batches)
    lengths = torch.cat([b.attention_mask.sum(-1) for b in batches]).float()
    scored = sum(int(b.loss_mask.sum()) for b in batches) / sum(int(b.attention_mask[:, 1:].sum()) for b in batches)
    print(
        f"{len(batches)} batches of {batches[0].size} episodes; length mean {lengths.mean():.1f}, "
        f"max {lengths.max():.0f}; {scored:.0%} of targets scored by the loss; "
        f"{args.repeats} repeats per path, torch threads {args.torch_threads}"
    )
    header = f"{'beta':>5} {'micro':>5} {'sorted':>6} " + "".join(f"{p + ' s':>9}" for p in PATHS)
    header += f" {'full/lean':>9} {'full/shared':>11}  " + "".join(f"{'|g| ' + p:>11}" for p in PATHS)
    header += "".join(f"{'rss ' + p:>11}" for p in PATHS)
    print(header)
    ok, first_ratio = True, {}
    for beta in args.betas:
        for micro in args.micro_batch_sizes:
            for sort in [False, True] if args.sort_by_length else [False]:
                config = dataclasses.replace(base, beta=beta, micro_batch_size=micro)
                runs = measure(config, model, [sort_by_length(b) for b in batches] if sort else batches, args.repeats)
                seconds = {p: statistics.median(runs[p]["seconds"]) for p in PATHS}
                same = all(
                    agree(runs["full"][k], runs[p][k]) for p in PATHS for k in ("loss", "grad_norm")
                )  # the loss alone is the surrogate at ratio 1: the gradient norm tells paths apart
                ok &= same
                first_ratio.setdefault(beta, seconds["full"] / seconds["shared"])
                norms = [statistics.mean(runs[p]["grad_norm"]) for p in PATHS]
                rss = [statistics.median(runs[p]["memory/peak_rss_gb"]) for p in PATHS]
                print(
                    f"{beta:>5} {micro:>5} {'yes' if sort else 'no':>6} "
                    + "".join(f"{seconds[p]:>9.3f}" for p in PATHS)
                    + f" {seconds['full'] / seconds['lean']:>8.2f}x {seconds['full'] / seconds['shared']:>10.2f}x  "
                    + "".join(f"{n:>11.5f}" for n in norms)
                    + "".join(f"{r:>11.3f}" for r in rss)
                    + ("" if same else "  LOSSES DIFFER")
                )
    met = all(r >= args.target for r in first_ratio.values())
    print(f"target {args.target}x, full/shared (first micro-batch size, unsorted): {'met' if met else 'MISSED'}")
    return 0 if ok and met else 1


if __name__ == "__main__":
    sys.exit(main())
