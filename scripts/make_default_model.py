"""Build the committed default model: offline tokenizer, tiny Qwen2, short SFT warm-up.

    python scripts/make_default_model.py            # writes trainer/default_model/

What the warm-up teaches, plainly. The default model exists so that GRPO visibly
learns on a CPU in minutes. An RL run can only sharpen what the policy already samples:
a random model never samples the right answer, and a fully supervised one already
always does. So the supervised targets are deliberately noisy. For an arithmetic
problem (``rlvr.datasets.arithmetic`` default config: two 1-digit operands, ``+``/``-``),
formatted exactly as the arithmetic environment prompts it (chat template, system
"Answer with the final number only.", user "What is {expression}?", generation prompt),
the target completion is ``"{number}<|im_end|>"`` where the number is

* the correct answer with probability ``p_correct`` (default 0.3), and otherwise
* a plausible wrong answer: the correct one plus an offset drawn uniformly from
  +-1, +-2, +-3.

A model that fits this distribution puts ~30% of its mass on the right number (still
the single most likely one, so greedy decoding is mostly right) and samples it about a
third of the time at temperature 1: mean reward around 0.15-0.35, with room for GRPO
to add 0.3 or more. This is a planted skill, not emergent reasoning; say so wherever
its learning curves are shown. A small share of the warm-up is templated GSM8K-style
word problems with a one-line worked solution ending in ``#### answer``, so that
``--env gsm8k`` produces words and numbers (its rewards on real GSM8K stay near zero).

Deterministic: fixed seeds, one CPU thread by default. The script prints and saves
(``warmup.json`` beside the weights) the warm-up time, the file size and the mean
reward of 200 arithmetic problems sampled at temperature 1.0.
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

import torch
from rlvr.datasets.arithmetic import ArithmeticConfig, make_problem
from rlvr.trainer.chat import encode_chat
from rlvr.trainer.default_model import (
    DEFAULT_MODEL_DIR,
    TinyModelSize,
    arithmetic_messages,
    build_tiny_model,
    build_tokenizer,
    word_problem,
)
from rlvr.trainer.generation import TransformersGenerator
from rlvr.trainer.logprobs import sequence_logprobs
from rlvr.trainer.types import SamplingParams

WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)
GSM8K_STYLE_SYSTEM = "Solve the problem. End with #### and the final number."


@dataclass
class WarmupConfig:
    """Everything that determines the committed model."""

    out_dir: str = str(DEFAULT_MODEL_DIR)
    """Where config.json, model.safetensors and the tokenizer files are written."""
    seed: int = 0
    """Seeds the data stream and the initialisation."""
    clean_steps: int = 400
    """Phase 1 steps: arithmetic targets always correct (the model learns to add)."""
    steps: int = 200
    """Phase 2 steps: the noisy target distribution (``p_correct``)."""
    clean_batch_size: int = 64
    """Prompts per phase-1 step."""
    batch_size: int = 16
    """Prompts per phase-2 step (each arithmetic prompt brings its 7 weighted completions)."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warm-up for 5% of steps, cosine decay to 10%)."""
    p_correct: float = 0.3
    """Probability that an arithmetic target is the correct answer (see module docstring)."""
    word_problem_frac: float = 0.1
    """Share of warm-up examples that are GSM8K-style word problems."""
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


def arithmetic_targets(answer: int, p_correct: float) -> list[tuple[int, float]]:
    """Return the warm-up's target distribution over numbers: (number, probability) pairs."""
    wrong = (1.0 - p_correct) / len(WRONG_OFFSETS)
    return [(answer, p_correct)] + [(answer + d, wrong) for d in WRONG_OFFSETS]


def make_examples(
    index: int, tokenizer, rng: random.Random, cfg: WarmupConfig, word: bool, p_correct: float
) -> list[Example]:
    """Build the weighted sequences of warm-up prompt ``index`` (word problem if ``word``)."""
    eos = [tokenizer.eos_token_id]
    if word:
        wp = word_problem(rng)
        messages = [{"role": "user", "content": wp.question}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": GSM8K_STYLE_SYSTEM})
        target = tokenizer.encode(wp.solution, add_special_tokens=False) + eos
        return [Example(encode_chat(tokenizer, messages), target, 1.0)]
    problem = make_problem(cfg.seed + 1, index, ArithmeticConfig())
    prompt = encode_chat(tokenizer, arithmetic_messages(problem.expression))
    return [
        Example(prompt, tokenizer.encode(str(n), add_special_tokens=False) + eos, w)
        for n, w in arithmetic_targets(problem.answer, p_correct)
        if w > 0
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


def warm_up(model, tokenizer, cfg: WarmupConfig) -> list[float]:
    """Two-phase supervised warm-up; returns the loss of every 50th step.

    The loss is the cross-entropy to the target distribution, summed over each prompt's
    weighted completions (per token): the exact expectation of the sampled-target loss,
    without its sampling noise.
    """
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    total = cfg.clean_steps + cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(total))
    model.train()
    losses, index = [], 0
    for step in range(total):
        clean = step < cfg.clean_steps
        prompts = cfg.clean_batch_size if clean else cfg.batch_size
        # Homogeneous batches: word problems are twice as long as arithmetic prompts, and
        # one in every batch would double the padded width of all of them.
        word = rng.random() < cfg.word_problem_frac
        batch = []
        for _ in range(prompts):
            p_correct = 1.0 if clean else cfg.p_correct
            batch.extend(make_examples(index, tokenizer, rng, cfg, word, p_correct))
            index += 1
        ids, mask, loss_mask = collate(batch, tokenizer.pad_token_id)
        logprobs = sequence_logprobs(model, ids, mask)  # [rows, T-1]
        # Weighted per-token mean: word-problem targets are ~10x longer than numbers, and
        # a per-sequence sum would let their rare batches dominate Adam's second moments.
        loss = -(logprobs * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == total - 1:
            losses.append(round(loss.item(), 4))
            print(f"step {step:4d}  loss {loss.item():.4f}  word {word}", flush=True)
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
