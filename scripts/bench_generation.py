#!/usr/bin/env python
"""Transformers vs vLLM generation on the same prompts: completions and tokens per second.

    python scripts/bench_generation.py                          # the committed default model
    python scripts/bench_generation.py --hidden-size 256 --layers 8 --max-new-tokens 128

Both generators sample ``--group-size`` completions for each of ``--prompts`` arithmetic
prompts (chat-encoded, as training does) at T=1 with ``ignore_eos``, so every completion
is exactly ``--max-new-tokens`` long and both do the same work. One warm-up call each is
not timed; then ``--repeats`` calls are. ``--hidden-size`` / ``--layers`` build a random
Qwen2 of that shape (4 heads: vLLM's CPU attention needs a head dim of 32, 64, 80, ...,
so hidden 128, 256, 320, ...) saved to a temporary folder, which both load.

Threads: the transformers generator runs first with ``torch.set_num_threads(--threads)``;
vLLM's CPU worker binds its OpenMP threads to cores 0..threads-1
(``VLLM_CPU_OMP_THREADS_BIND``), and, in process, would then pin torch ops of the whole
process too, which is why it runs second. The engine runs eager (``enforce_eager``):
torch.compile on CPU costs minutes of start-up on a 2-core machine.

The 1-minute load average is sampled every second during each generator's timed calls
(``bench_async._LoadSampler``); timings on a loaded machine mean little.

Measured on the 2-vCPU development VM with the defaults, idle (load 0.2-0.5): transformers
0.602 s/call, 106 completions/s, 6805 tok/s; vLLM 0.784 s/call, 82 completions/s, 5223 tok/s
(0.77x). On a 0.92M-parameter model the work per token is tiny and vLLM's per-step
scheduling overhead dominates; its advantage is expected on real model sizes and on GPUs
(not measured here). Earlier, NOT idle (other developers'
test runs kept the 1-minute load at 3.4-3.8 on 2 cores), two runs minutes apart:
transformers 732 tok/s, vLLM 288 (0.39x) in the first; transformers 173, vLLM 542
(3.13x) in the second. Under that load the numbers say nothing about either engine
(vLLM binds its threads to cores, which suffers most when the cores are shared); rerun
on an idle machine before quoting a ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_async import _LoadSampler

from rlvr.trainer.algorithm.chat import encode_chat
from rlvr.trainer.engines.models import (
    DEFAULT_MODEL_DIR,
    arithmetic_messages,
    build_tiny_model,
    build_tokenizer,
    load_model,
)
from rlvr.trainer.protocols import SamplingParams


@dataclass
class Row:
    name: str
    seconds: float
    """Mean wall time of one timed generate call."""
    completions: int
    tokens: int
    load_mean: float
    load_max: float

    @property
    def completions_per_s(self) -> float:
        return self.completions / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def _time(name: str, generator, prompts: list[list[int]], args: argparse.Namespace) -> Row:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, ignore_eos=True)
    generator.generate(prompts, args.group_size, params)  # warm-up, not timed
    times, tokens = [], 0
    with _LoadSampler() as load:
        for _ in range(args.repeats):
            start = time.perf_counter()
            groups = generator.generate(prompts, args.group_size, params)
            times.append(time.perf_counter() - start)
            tokens = sum(len(c.token_ids) for g in groups for c in g)
    return Row(name, statistics.fmean(times), len(prompts) * args.group_size, tokens,
               statistics.fmean(load.samples) if load.samples else float("nan"),
               max(load.samples, default=float("nan")))  # fmt: skip


def _model_dir(args: argparse.Namespace, scratch: Path) -> Path:
    if args.hidden_size is None and args.layers is None:
        return DEFAULT_MODEL_DIR
    tokenizer = build_tokenizer()
    hidden, layers = args.hidden_size or 128, args.layers or 4
    size = {"hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    build_tiny_model(tokenizer, seed=0, **size).save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return scratch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--hidden-size", type=int, default=None, help="random Qwen2 of this width")
    parser.add_argument("--layers", type=int, default=None, help="random Qwen2 of this depth")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = _model_dir(args, Path(scratch))
        model, tokenizer = load_model(str(folder))
        prompts = [encode_chat(tokenizer, arithmetic_messages(f"{i}+{2 * i + 1}")) for i in range(args.prompts)]
        from rlvr.trainer.engines.transformers_generator import TransformersGenerator

        rows = [_time("transformers", TransformersGenerator(model, tokenizer), prompts, args)]
        try:
            from rlvr.trainer.engines.vllm_generator import VLLMGenerator
        except ImportError as error:
            print(f"vllm: not installed ({error}); only the transformers row", file=sys.stderr)
        else:
            max_len = max(map(len, prompts)) + args.max_new_tokens
            vllm_gen = VLLMGenerator(folder, tokenizer, dtype="float32", max_model_len=max_len,
                                     enforce_eager=True, kv_cache_memory_bytes=256 << 20)  # fmt: skip
            rows.append(_time("vllm", vllm_gen, prompts, args))
    _report(rows, args, model)
    return 0


def _report(rows: list[Row], args: argparse.Namespace, model: torch.nn.Module) -> None:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} tokens, "
          f"{params:.2f}M-parameter model, {args.threads} threads, {args.repeats} timed calls each")  # fmt: skip
    print(f"{'generator':<14}{'s/call':>9}{'compl/s':>10}{'tokens/s':>11}{'x transformers':>16}{'load mean':>11}"
          f"{'load max':>10}")  # fmt: skip
    base = rows[0].tokens_per_s
    for r in rows:
        print(f"{r.name:<14}{r.seconds:>9.3f}{r.completions_per_s:>10.1f}{r.tokens_per_s:>11.0f}"
              f"{r.tokens_per_s / base:>16.2f}{r.load_mean:>11.2f}{r.load_max:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
