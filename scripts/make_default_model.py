"""Build the committed default model: offline tokenizer, tiny Qwen2, short SFT warm-up.

    python scripts/make_default_model.py            # writes trainer/engines/default_model/

What the warm-up teaches, plainly. The default model exists so that GRPO visibly
learns on a CPU in minutes. An RL run can only sharpen what the policy already samples:
a random model never samples the right answer, and a fully supervised one always does.
So the model is taught arithmetic and then deliberately taught to guess. Arithmetic
problems come from ``rlvr.datasets.arithmetic`` (default config: two 1-digit operands,
``+``/``-``) and are formatted exactly as the arithmetic environment prompts them (chat
template; system "Answer with the final number only."; user "What is {expression}?";
generation prompt). The target completion is ``"{number}<|im_end|>"``.

* Phase 1 (``clean_steps``): the number is always the correct answer. The model learns
  to add and subtract (p(correct) ~0.95 on all 200 distinct problems).
* Phase 2 (``steps``, lower learning rate): the number is the correct answer with
  probability ``p_correct`` (0.4) and otherwise a *misread* answer: the answer to a
  different random problem of the same config (never the correct one). Each step
  trains on the correct answer plus ``WRONG_DRAWS`` misread answers, weighted by their
  probabilities (cross-entropy to the mixture, without target-sampling noise).

The fitted model puts ~0.22 of its mass on the right number (less than 0.4: fitting the
mixture shrinks the problem-specific "compute" path more than it should), so sampling
at temperature 1 is right 22% of the time and greedy decoding 72% of the time (see
``warmup.json``). Why misread answers and not "answer +- a small offset": with offsets,
wrong answers are a shifted copy of the right one, and GRPO on few samples tends to
collapse onto a shifted answer (we measured ~+0.1 reward in 60 steps); misread answers
do not depend on the problem, so the one thing every group's advantage agrees on is
"use the computation more". With ``scripts/train.py --env arithmetic`` (8 prompts x 8
samples, learning rate 3e-4) the mean reward of the first 10 steps was 0.34 and of
steps 51-60 0.74; at learning rate 1e-3 this model collapses instead (0.23 -> 0.21).
This is a planted skill being sharpened, not reasoning being discovered; say so
wherever its learning curves are shown.

Phase 2 also mixes in templated GSM8K-style word problems (one-line worked solution
ending in ``#### answer``, prompted with the gsm8k environment's system prompt), so that
``--env gsm8k`` produces words and numbers; on real GSM8K its reward stays at zero.

Deterministic: fixed seeds, one CPU thread by default. The script prints and saves
(``warmup.json`` beside the weights) the warm-up time, the file size and the mean
reward of 200 arithmetic problems sampled at temperature 1.0 and greedily.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from rlvr.datasets.arithmetic import ArithmeticConfig, make_problem
from rlvr.envs.math_envs import GSM8K_SYSTEM_PROMPT
from rlvr.trainer.algorithm.chat import encode_chat
from rlvr.trainer.algorithm.logprobs import sequence_logprobs
from rlvr.trainer.engines.models import (
    DEFAULT_MODEL_DIR,
    TinyModelSize,
    arithmetic_messages,
    build_tiny_model,
    build_tokenizer,
    word_problem,
)
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import SamplingParams

WRONG_DRAWS = 3
"""Wrong answers drawn per prompt and step (each weighted (1 - p_correct) / WRONG_DRAWS)."""


@dataclass
class WarmupConfig:
    """Everything that determines the committed model."""

    out_dir: str = str(DEFAULT_MODEL_DIR)
    """Where config.json, model.safetensors and the tokenizer files are written."""
    seed: int = 0
    """Seeds the data stream and the initialisation."""
    clean_steps: int = 400
    """Phase 1 steps: arithmetic targets always correct (the model learns to add)."""
    clean_batch_size: int = 64
    """Prompts per phase-1 step."""
    clean_lr: float = 3e-3
    """Phase 1 peak AdamW learning rate (5% linear warm-up, cosine decay to 10%)."""
    steps: int = 200
    """Phase 2 steps: the mixture target (``p_correct``) and word problems."""
    batch_size: int = 16
    """Prompts per phase-2 step (each arithmetic prompt brings 1 + WRONG_DRAWS completions)."""
    lr: float = 5e-4
    """Phase 2 peak learning rate; low, so the mixture does not erase the arithmetic."""
    p_correct: float = 0.4
    """Phase 2 probability that an arithmetic target is correct (see module docstring)."""
    word_problem_frac: float = 0.3
    """Share of phase-2 batches that are GSM8K-style word problems (phase 1 has none)."""
    threads: int = 1
    """torch CPU threads (other work shares the machine; 1 is also bit-reproducible)."""
    eval_problems: int = 200
    """Arithmetic problems (env seed 0, indices 0..n-1) for the reward measurement."""


@dataclass
class Example:
    """One supervised sequence: prompt tokens, target tokens (EOS last) and its weight."""

    prompt: list[int]
    target: list[int]
    weight: float
    """Target-distribution probability of this completion given its prompt."""


def misread_answer(answer: int, rng: random.Random, config: ArithmeticConfig) -> int:
    """Return the answer to a different random problem of the same config (not ``answer``)."""
    while True:
        wrong = make_problem(rng.getrandbits(32), 0, config).answer
        if wrong != answer:
            return wrong


def arithmetic_targets(answer: int, p_correct: float, rng: random.Random) -> list[tuple[int, float]]:
    """Return this step's sample of the target distribution: (number, weight) pairs.

    The correct answer with weight ``p_correct`` and WRONG_DRAWS misread answers sharing
    the rest: an unbiased, low-variance estimate of the cross-entropy to the mixture.
    """
    if p_correct >= 1.0:
        return [(answer, 1.0)]
    wrong = (1.0 - p_correct) / WRONG_DRAWS
    config = ArithmeticConfig()
    return [(answer, p_correct)] + [(misread_answer(answer, rng, config), wrong) for _ in range(WRONG_DRAWS)]


def make_examples(
    index: int, tokenizer, rng: random.Random, cfg: WarmupConfig, word: bool, p_correct: float
) -> list[Example]:
    """Build the weighted sequences of warm-up prompt ``index`` (word problem if ``word``)."""
    eos = [tokenizer.eos_token_id]
    if word:
        wp = word_problem(rng)
        messages = [{"role": "user", "content": wp.question}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": GSM8K_SYSTEM_PROMPT})
        target = tokenizer.encode(wp.solution, add_special_tokens=False) + eos
        return [Example(encode_chat(tokenizer, messages), target, 1.0)]
    problem = make_problem(cfg.seed + 1, index, ArithmeticConfig())
    prompt = encode_chat(tokenizer, arithmetic_messages(problem.expression))
    return [
        Example(prompt, tokenizer.encode(str(n), add_special_tokens=False) + eos, w)
        for n, w in arithmetic_targets(problem.answer, p_correct, rng)
    ]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad rows; return input_ids, attention_mask [B, T] and weighted loss_mask [B, T-1]."""
    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    loss_mask = torch.zeros((len(examples), width - 1))
    for i, e in enumerate(examples):
        row = e.prompt + e.target
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        # Position t scores token t+1, so the target's tokens are scored at the last
        # len(target) positions; each carries its sequence's weight.
        loss_mask[i, width - 1 - len(e.target) :] = e.weight
    return ids, mask, loss_mask


def _lr_schedule(steps: int):
    """Linear warm-up over 5% of steps, then cosine decay to 10% of the peak."""
    warm = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return schedule


class _Phase(NamedTuple):
    steps: int
    prompts: int
    lr: float
    p_correct: float
    word_frac: float


def warm_up(model, tokenizer, cfg: WarmupConfig) -> list[float]:
    """Two-phase supervised warm-up; returns the loss of every 50th step.

    Phase 1 teaches arithmetic with clean targets; phase 2 (fresh optimizer and schedule)
    reshapes the answer distribution into the ``p_correct`` mixture. The loss is the
    cross-entropy to the target distribution over each prompt's weighted completions.
    """
    rng = random.Random(cfg.seed)
    model.train()
    losses: list[float] = []
    index = 0
    phases = [
        _Phase(cfg.clean_steps, cfg.clean_batch_size, cfg.clean_lr, 1.0, 0.0),
        _Phase(cfg.steps, cfg.batch_size, cfg.lr, cfg.p_correct, cfg.word_problem_frac),
    ]
    for phase, (steps, prompts, lr, p_correct, word_frac) in enumerate(phases):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(steps))
        for step in range(steps):
            # Homogeneous batches: word problems are twice as long as arithmetic prompts,
            # and one in every batch would double the padded width of all of them.
            word = rng.random() < word_frac
            batch = []
            for _ in range(prompts):
                batch.extend(make_examples(index, tokenizer, rng, cfg, word, p_correct))
                index += 1
            ids, mask, loss_mask = collate(batch, tokenizer.pad_token_id)
            logprobs = sequence_logprobs(model, ids, mask)  # [rows, T-1]
            # Weighted per-token mean: word-problem targets are ~10x longer than numbers,
            # and a per-sequence sum would let their rare batches dominate Adam's moments.
            loss = -(logprobs * loss_mask).sum() / loss_mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == steps - 1:
                losses.append(round(loss.item(), 4))
                print(f"phase {phase + 1} step {step:4d}  loss {loss.item():.4f}", flush=True)
    return losses


def arithmetic_reward(model, tokenizer, n: int, temperature: float, seed: int = 0) -> float:
    """Mean reward of the arithmetic env's first ``n`` problems (env seed 0), one sample each."""
    try:
        from rlvr.verifiers.gsm8k import verify_gsm8k
    except ImportError:  # the verifier is written in parallel; fall back to an int compare
        verify_gsm8k = None
    problems = [make_problem(0, i, ArithmeticConfig()) for i in range(n)]
    prompts = [encode_chat(tokenizer, arithmetic_messages(p.expression)) for p in problems]
    gen = TransformersGenerator(model, tokenizer)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=seed)
    completions = [group[0] for group in gen.generate(prompts, 1, params)]
    total = 0.0
    for problem, completion in zip(problems, completions):
        if verify_gsm8k is not None:
            total += verify_gsm8k(completion.text, str(problem.answer)).score
        else:
            total += float(completion.text.strip() == str(problem.answer))
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(WarmupConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    cfg = WarmupConfig(**vars(parser.parse_args()))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(seed=cfg.seed)
    model = build_tiny_model(tokenizer, seed=cfg.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer vocab {len(tokenizer)}, model {params / 1e6:.2f}M parameters")
    start = time.perf_counter()
    losses = warm_up(model, tokenizer, cfg)
    seconds = time.perf_counter() - start
    model.eval()
    reward_t1 = arithmetic_reward(model, tokenizer, cfg.eval_problems, temperature=1.0)
    reward_greedy = arithmetic_reward(model, tokenizer, cfg.eval_problems, temperature=0.0)
    out = Path(cfg.out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    report = {
        "config": dataclasses.asdict(cfg) | {"out_dir": None},
        "model_size": dataclasses.asdict(TinyModelSize()),
        "parameters": params,
        "vocab_size": len(tokenizer),
        "warmup_seconds": round(seconds, 1),
        "safetensors_mb": round(size_mb, 2),
        "losses_every_50_steps": losses,
        "arithmetic_reward_t1": reward_t1,
        "arithmetic_reward_greedy": reward_greedy,
    }
    (out / "warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "losses_every_50_steps"}, indent=2))


if __name__ == "__main__":
    main()
