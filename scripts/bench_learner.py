#!/usr/bin/env python
"""The learner's step, full logits against logits only where the loss reads them, side by side.

    python scripts/bench_learner.py                              # issue 23's workload, beta 0 and 0.04
    python scripts/bench_learner.py --micro-batch-sizes 16 32 128 --sort-by-length

The workload is issue 23's: ``--env arithmetic --prompts-per-step 16`` with group size 8 on
the default model (``trainer/engines/default_model``), every other setting ``TrainConfig``'s
default. Rollouts are collected once (``--batches`` steps of the synchronous loop's
``Player``, all sampled by the initial weights, so every batch is on-policy); then, for
each ``--betas`` value and micro-batch size, each batch is learned ``--repeats`` times by
each path, alternating which goes first, every time from the same weights and a fresh
optimizer. The two paths are ``torch_learner.LEAN_LOGITS``:

- ``full``: the LM head, log-softmax and entropy at every real position (the code before
  issue 23), for the policy and the reference passes;
- ``lean``: only on the target tokens the loss scores.

The table gives the median seconds of ``learner.step`` per path, the ratio full / lean,
both paths' loss and gradient norm (means over the batches), which must agree: the script
exits 1 where they differ by more than float rounding, or where the ratio misses
``--target`` on the first micro-batch size; and the median peak resident set of a step
(``memory/peak_rss_gb``, GB). With one iteration the loss is the surrogate at ratio 1,
whatever the log-probabilities (and the KL is 0: the reference starts as the policy), so
it is the gradient norm that tells two paths apart. ``--sort-by-length`` adds rows where
the batch's rows are sorted by length before the step (micro-batches then carry less
padding; the loss is a sum over rows, so it does not change). On a shared machine the
numbers are noisy: run it more than once. One torch thread by default: with two threads on
two cores that other processes share, torch's thread pool waits on its busy peers and a
step takes 5-10x longer, by chance more for one path than the other.

Measured on the 2-vCPU development VM while other people's training runs kept its
1-minute load at 6-7 (so the absolute seconds are inflated), two invocations of the
defaults: beta 0, full 0.834 / 0.728 s, lean 0.599 / 0.571 s (1.39x, 1.27x); beta 0.04,
full 0.960 / 1.003 s, lean 0.766 / 0.855 s (1.25x, 1.17x); equal losses and gradient norms
throughout. 9% of the targets are scored, and a profile of the lean step puts the LM head
at about 2% of it: what is left is the model body, which both paths run alike (with beta
> 0 the reference's forward too, which is why that ratio is lower). Micro-batches of 32,
64 and 128 rows did not time consistently faster than 16 on this model (1.16-1.23x,
within the noise) and raise the step's peak resident set (0.53, 0.58, 0.67, 0.77 GB);
sorting by length cannot help here (lengths 29.4 mean, 31 max).
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
