#!/usr/bin/env python
"""The learner's memory and speed: full training against LoRA, padded against packed, side by side.

    python scripts/bench_memory.py                      # 4 settings, ~5 min on 2 cores, one thread
    python scripts/bench_memory.py --settings full-padded full-packed --steps 3

Issue 23's memory benchmark. One model of a few tens of millions of parameters with random
weights (a Qwen2 built here: hidden 512, 8 layers, vocab 32k, tied embeddings: 41M), saved
to a temporary folder, and one long-tailed length mix, built as ``TrainBatch`` objects
directly (no generation): a 32-token prompt and completions whose lengths are drawn from an
exponential (mean ``--mean-completion``), a few of them (``--long``) at the generation
budget ``--max-completion``, as in reasoning RL where most answers are short and a few run
to the budget. Each setting learns the same batches from the same weights with the
learner ``build_learner`` makes from a ``TrainConfig`` (``--beta 0.04`` by default, so the
full settings load a second model as the reference and LoRA's reference is its own base):

- ``full-padded``: every weight trains, micro-batches of ``--micro-batch-size`` rows padded to
  their longest row (today's default);
- ``full-packed``: every weight trains, ``--micro-batch-tokens`` packed micro-batches;
- ``lora-padded`` / ``lora-packed``: the same with ``--lora-rank`` adapters (peft).

Each setting runs in a child process of its own (one after the other, ``--threads`` torch
threads), so one setting's freed memory cannot be counted in the next one's peak. Per
setting: the step's peak resident set (``memory/peak_rss_gb``, the learner's metric), the
resident set before the step (weights, optimizer state, the reference; the difference is
what the step itself takes), learner tokens per second (real tokens, no padding, over the
median step time of ``--steps`` timed steps after one warm-up step), the tokens the model
body processed per step (padding included) and the bytes one weight sync sends
(``learner.weights_for_generation()``: the full state dict, or the adapters; tied
weights counted once). The first step's loss and gradient norm of packed and padded must
agree (same weights, same batch): the script exits 1 where they do not.

Measured on the 2-vCPU development VM, the defaults (one thread per setting; other people's
jobs kept the 1-minute load at 3.3-4.4, so the seconds are noisy; 4 min 15 s in all)::

    setting        trained  peak GB  rest GB  step s   tok/s  body tok  mbs  sync MB
    full-padded     40.52M    4.404    1.278   35.03     102     10440    4   162.06
    full-packed     40.52M    2.452    1.279   17.59     203      3578    4   162.06
    lora-padded      1.21M    4.372    0.659   31.11     115     10440    4     4.85
    lora-packed      1.21M    2.030    0.660   16.04     223      3578    4     4.85

Packed/padded: 1.99x (full) and 1.94x (LoRA) tokens per second, peak memory 0.56x and
0.46x, the body runs 0.34x the tokens; first-step loss and gradient norm equal. LoRA/full:
resting memory 0.52x (no optimizer state or gradients for the base, no second model for
the reference), peak 0.99x padded and 0.83x packed (on this small model with a long tail
the step's activations dominate the peak, and LoRA keeps the same activations), bytes per
weight sync 0.030x (4.85 MB of adapters against 162 MB).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = {
    "full-padded": (False, False),
    "full-packed": (False, True),
    "lora-padded": (True, False),
    "lora-packed": (True, True),
}
"""name -> (LoRA, packed)."""


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--episodes", type=int, default=32, help="rows per batch")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--mean-completion", type=float, default=40.0)
    parser.add_argument("--max-completion", type=int, default=480, help="the generation budget")
    parser.add_argument("--long", type=int, default=3, help="episodes at the budget")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per padded micro-batch")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024, help="token budget per packed micro-batch")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one setting in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model_folder(folder: Path, args: argparse.Namespace) -> int:
    """Save a random Qwen2 of the requested shape and the suite's tokenizer to ``folder``; return its parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlvr.trainer.engines.models import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden_size,
        intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def completion_lengths(args: argparse.Namespace, seed: int) -> list[int]:
    """A long-tailed mix: exponential lengths (at least 1, at most the budget), ``--long`` of them at the budget."""
    rng = torch.Generator().manual_seed(seed)
    draws = torch.empty(args.episodes).exponential_(1.0 / args.mean_completion, generator=rng)
    lengths = [max(1, min(args.max_completion, math.ceil(x))) for x in draws.tolist()]
    for i in torch.randperm(args.episodes, generator=rng)[: args.long].tolist():
        lengths[i] = args.max_completion
    return lengths


def make_batch(args: argparse.Namespace, seed: int, pad_id: int):
    """One ``TrainBatch`` of the length mix: random tokens, log-probs and advantages, groups of 8."""
    from rlvr.trainer.algorithm.batch import pack_episodes
    from rlvr.trainer.algorithm.rollout import Episode

    rng = torch.Generator().manual_seed(seed)
    episodes, advantages = [], []
    for i, n in enumerate(completion_lengths(args, seed)):
        prompt = torch.randint(3, args.vocab, (args.prompt_tokens,), generator=rng).tolist()
        tokens = torch.randint(3, args.vocab, (n,), generator=rng).tolist()
        logprobs = (-torch.rand(n, generator=rng) * 3 - 7).tolist()  # about log(1/32k): a random model's
        episodes.append(
            Episode(group=i // 8, task_id=str(i // 8), prompt_ids=prompt, token_ids=tokens, loss_mask=[1] * n,
                    logprobs=logprobs, turn_ids=[0] * n, turn_rewards=[0.0], completions=[""], versions=[0])
        )  # fmt: skip
        advantages.append([float(torch.randn(1, generator=rng))])
    return pack_episodes(episodes, advantages, pad_id)


def _trim() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``), so a step's peak starts from live memory only.

    Without it, the resident set before a step still holds what the previous step freed
    (glibc keeps it for reuse), and the peak of a step is at least that.
    """
    name = ctypes.util.find_library("c")
    if name:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _rss_gb() -> float:
    """The process's resident set now (``VmRSS``), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return math.nan


def run_setting(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    """Build the setting's learner, learn the batches, return its measurements (in a child process)."""
    from rlvr.trainer.config import TrainConfig
    from rlvr.trainer.engines.build import build_learner
    from rlvr.trainer.engines.models import load_model

    torch.set_num_threads(args.threads)
    lora, packed = SETTINGS[name]
    if lora and "lora_rank" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return {"setting": name, "skipped": "TrainConfig has no lora_rank field yet (LoRA is not in this checkout)"}
    settings = {
        "model": args.folder,
        "beta": args.beta,
        "micro_batch_size": args.micro_batch_size,
        "micro_batch_tokens": args.micro_batch_tokens if packed else 0,
        "learning_rate": 1e-5,
        "torch_threads": args.threads,
    }
    if lora:
        settings |= {"lora_rank": args.lora_rank, "lora_alpha": 2.0 * args.lora_rank}
    config = TrainConfig(**settings)
    model, tokenizer = load_model(args.folder)
    torch.manual_seed(0)  # the adapters' initial A
    learner = build_learner(config, model, torch.device("cpu"))
    sent = {t.data_ptr(): t.numel() * t.element_size() for t in learner.weights_for_generation().values()}
    batches = [make_batch(args, seed, tokenizer.pad_token_id) for seed in range(1 + args.steps)]
    seconds, peaks, rests, first = [], [], [], {}
    for i, batch in enumerate(batches):
        _trim()
        rests.append(_rss_gb())
        begin = time.perf_counter()
        metrics = learner.step(batch, on_policy=True)
        seconds.append(time.perf_counter() - begin)
        peaks.append(metrics["memory/peak_rss_gb"])
        if i == 0:
            first = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
    groups = learner._micro_batches(batches[-1])  # the plan of a step: what the body processed
    body_tokens = sum(batch.select(rows).attention_mask.numel() for rows in groups)
    real = float(batches[-1].attention_mask.sum())
    timed = seconds[1:] or seconds
    return {
        "setting": name,
        "params_trained": float(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "peak_rss_gb": max(peaks[1:] or peaks),
        "rest_rss_gb": max(rests[1:] or rests),
        "step_s": statistics.median(timed),
        "tokens_per_s": real / statistics.median(timed),
        "real_tokens": real,
        "body_tokens": float(body_tokens if not packed or not learner._packs else real),
        "micro_batches": float(len(groups)),
        "sync_mb": sum(sent.values()) / 1e6,
        "loss_step1": first["loss"],
        "grad_norm_step1": first["grad_norm"],
    }


def _child(name: str, folder: str, argv: list[str]) -> dict[str, float | str]:
    cmd = [sys.executable, __file__, *argv, "--child", name, "--folder", folder]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"setting": name, "skipped": f"failed (exit {done.returncode}): {done.stderr.strip()[-800:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args: argparse.Namespace) -> int:
    """Print the table and the ratios; return 1 where packed and padded disagree on the first step."""
    print(
        f"\n{'setting':<12} {'trained':>9} {'peak GB':>8} {'rest GB':>8} {'step s':>7} {'tok/s':>7} "
        f"{'body tok':>9} {'mbs':>4} {'sync MB':>8} {'loss@1':>10} {'|g|@1':>8}"
    )
    by_name = {}
    for r in rows:
        if "skipped" in r:
            print(f"{r['setting']:<12} skipped: {r['skipped']}")
            continue
        by_name[r["setting"]] = r
        print(
            f"{r['setting']:<12} {r['params_trained'] / 1e6:>8.2f}M {r['peak_rss_gb']:>8.3f} {r['rest_rss_gb']:>8.3f} "
            f"{r['step_s']:>7.2f} {r['tokens_per_s']:>7.0f} {r['body_tokens']:>9.0f} {r['micro_batches']:>4.0f} "
            f"{r['sync_mb']:>8.2f} {r['loss_step1']:>10.6f} {r['grad_norm_step1']:>8.5f}"
        )
    status = 0
    print()
    for kind in ("full", "lora"):
        padded, packed = by_name.get(f"{kind}-padded"), by_name.get(f"{kind}-packed")
        if padded and packed:
            print(
                f"{kind}: packed/padded tokens per second {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x, "
                f"peak memory {packed['peak_rss_gb'] / padded['peak_rss_gb']:.2f}x, "
                f"body tokens {packed['body_tokens'] / padded['body_tokens']:.2f}x"
            )
            for key in ("loss_step1", "grad_norm_step1"):
                if abs(packed[key] - padded[key]) > 1e-5 + 1e-4 * abs(padded[key]):
                    print(f"  MISMATCH: {key} packed {packed[key]} padded {padded[key]}")
                    status = 1
    for layout in ("padded", "packed"):
        full, lora = by_name.get(f"full-{layout}"), by_name.get(f"lora-{layout}")
        if full and lora:
            print(
                f"{layout}: LoRA/full peak memory {lora['peak_rss_gb'] / full['peak_rss_gb']:.2f}x "
                f"(resting {lora['rest_rss_gb'] / full['rest_rss_gb']:.2f}x), "
                f"tokens per second {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x, "
                f"bytes per weight sync {lora['sync_mb'] / full['sync_mb']:.4f}x"
            )
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _arguments(argv)
    if args.child:
        print(json.dumps(run_setting(args.child, args)))
        return 0
    begin = time.perf_counter()
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), cpus: {os.cpu_count()}, threads: {args.threads}")
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        params = build_model_folder(Path(tmp), args)
        lengths = completion_lengths(args, 0)
        print(
            f"model: Qwen2, hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.1f}M "
            f"parameters; batch: {args.episodes} episodes, prompt {args.prompt_tokens}, completions mean "
            f"{statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, max {max(lengths)} tokens; "
            f"padded: {args.micro_batch_size} rows per micro-batch, packed: {args.micro_batch_tokens} tokens; "
            f"beta {args.beta}, LoRA rank {args.lora_rank}"
        )
        rows = []
        for name in args.settings:
            rows.append(_child(name, tmp, argv))
            print(f"  {name}: done at {time.perf_counter() - begin:.0f} s", flush=True)
    status = report(rows, args)
    print(f"\ntotal {time.perf_counter() - begin:.0f} s, load average after: {os.getloadavg()[0]:.2f}")
    return status


if __name__ == "__main__":
    sys.exit(main())
