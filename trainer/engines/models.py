r"""The default tiny model: an offline tokenizer, a tiny Qwen2, and the model loaders.

``scripts/train.py`` with no ``--model`` trains ``trainer/engines/default_model/``: a Qwen2
causal LM of about a million parameters with its own byte-level BPE tokenizer, both
built here without any download, and warmed up by ``scripts/make_default_model.py``
(see its docstring for what the warm-up teaches and why). It is loaded through
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` on the
committed folder, the same code path as a hub model, so nothing in the trainer special-
cases it.

Tokenizer trivia that matters here:

* transformers 5 loads a folder whose tokenizer_config names ``Qwen2Tokenizer`` by
  rebuilding the tokenizer from vocab + merges with Qwen2's own normalizer (NFC) and
  pre-tokenizer (the regex below, then byte-level). We train the BPE with exactly
  those rules and build the saved tokenizer through ``Qwen2Tokenizer`` itself, so token
  ids are identical after a save/reload round trip (a test checks it).
* Qwen2's pre-tokenizer regex splits ``\p{N}`` one character at a time, so every digit
  is its own token: arithmetic is learnable digit by digit.
* Special tokens and chat template follow Qwen2.5-Instruct (ChatML): ``<|im_start|>``,
  ``<|im_end|>`` (EOS: an assistant turn ends with it) and ``<|endoftext|>`` (padding).
  Like Qwen there is no BOS token; prompts start with ``<|im_start|>``.

``build_tokenizer`` and ``build_tiny_model`` are deterministic and are what tests use for
random-weight models.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers.utils.logging as hf_logging
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)

from rlvr.datasets.arithmetic import ArithmeticConfig, make_problem

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
"""The committed warm-up model folder (config, safetensors, tokenizer files)."""

ARITHMETIC_SYSTEM_PROMPT = "Answer with the final number only."
"""The arithmetic environment's system message; the warm-up uses it verbatim."""

PAD_TOKEN, CHAT_START, CHAT_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2's pre-tokenizer regex (transformers models/qwen2/tokenization_qwen2.py). It must
# match what Qwen2Tokenizer rebuilds on load, or token ids change after a round trip.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as Qwen2.5-Instruct writes it, minus Qwen's default system prompt and tools.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSize:
    """Shape of a tiny Qwen2; the defaults are the committed default model's."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 4
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads (head_dim = hidden_size / heads)."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen2)."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE config advertises."""


TEST_SIZE = TinyModelSize(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
"""A smaller shape for fast unit tests."""


@dataclass(frozen=True)
class WordProblem:
    """A GSM8K-style word problem with a short worked solution ending in ``#### answer``."""

    question: str
    solution: str
    answer: int


_NAMES = ["Natalia", "James", "Maria", "Tom", "Aisha", "Carlos", "Mei", "John", "Sara", "Liam"]
_PRONOUNS = {"Natalia": "she", "Maria": "she", "Aisha": "she", "Mei": "she", "Sara": "she"}
_ITEMS = ["apples", "pencils", "books", "cookies", "marbles", "stickers", "eggs", "toys", "cards"]


def word_problem(rng: random.Random) -> WordProblem:
    """Draw one templated word problem (numbers small enough to compute mentally)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    pron = _PRONOUNS.get(name, "he")
    a, b = rng.randint(2, 60), rng.randint(2, 12)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{name} has {a} {item}. {pron.capitalize()} buys {b} more. How many {item} does {pron} have now?"
        ans, work = a + b, f"{name} has {a} + {b} = {a + b} {item} now."
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        ans, work = a - b, f"{name} has {a} - {b} = {a - b} {item} left."
    elif kind == 2:
        q = f"{name} buys {b} boxes of {item}. Each box holds {a % 12 + 2} {item}. How many {item} is that in total?"
        ans = b * (a % 12 + 2)
        work = f"{name} buys {b} * {a % 12 + 2} = {ans} {item}."
    elif kind == 3:
        q = f"A store sells {item} for ${b} each. {name} buys {a % 9 + 2} of them. How much does {pron} spend?"
        ans = b * (a % 9 + 2)
        work = f"{pron.capitalize()} spends {a % 9 + 2} * {b} = ${ans}."
    else:
        q = f"{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages did {pron} read in all?"
        ans, work = a + b, f"{pron.capitalize()} reads {a} + {b} = {a + b} pages."
    return WordProblem(question=q, solution=f"{work}\n#### {ans}", answer=ans)


# Everyday words of grade-school word problems, so GSM8K questions tokenize into words
# rather than bytes.
_WORDS = (
    "a an the and or but if then so because each every per more less than twice half "
    "times total left remaining how many much what which who when does did do is are was "
    "were has have had will would can could buy buys bought sell sells sold spend spent "
    "pay pays paid cost costs price dollars cents money earn earns earned save saves week "
    "weeks day days hour hours minute minutes year years month months morning night today "
    "people students children friends family mother father brother sister teacher class "
    "school store farm garden house car bus train miles feet inches meters pounds cups "
    "liters apples oranges bananas eggs chickens cows dogs cats birds fish trees flowers "
    "pizza slices cake pies candy bags boxes baskets rows pages books hours tickets "
    "shirts shoes water milk juice number numbers first second third last other another "
    "some all both together altogether remaining difference sum product percent "
    "fraction average speed rate work works worked make makes made give gives gave take "
    "takes took get gets got find finds need needs wants wanted uses used runs walks "
    "drives reads writes plants picks eats drinks collects shares splits equally among "
    "between after before during since until from into onto with without about over "
    "under there their they them she her he his it its we our you your this that these "
    "those solve answer question problem step think first then finally therefore"
).split()


def arithmetic_messages(expression: str) -> list[dict]:
    """Return the arithmetic environment's prompt for ``expression`` as chat messages."""
    return [
        {"role": "system", "content": ARITHMETIC_SYSTEM_PROMPT},
        {"role": "user", "content": f"What is {expression}?"},
    ]


def _tokenizer_corpus(seed: int = 0, size: int = 6000) -> Iterator[str]:
    """Text the BPE merges are learned from: chat prompts, arithmetic, word problems, code."""
    rng = random.Random(seed)
    config = ArithmeticConfig(digits=3, operators="+-*", num_operands=3)
    code = "def solve(x):\n    return x + 1\n\nprint(solve(2))\nassert f(3) == 4\nfor i in range(10):\n"
    for i in range(size):
        problem = make_problem(seed, i, config)
        yield (
            f"{CHAT_START}system\n{ARITHMETIC_SYSTEM_PROMPT}{CHAT_END}\n{CHAT_START}user\n"
            f"What is {problem.expression}?{CHAT_END}\n{CHAT_START}assistant\n{problem.answer}{CHAT_END}"
        )
        wp = word_problem(rng)
        yield f"{wp.question}\n{wp.solution}"
        yield " ".join(rng.sample(_WORDS, 12)).capitalize() + "."
        if i % 20 == 0:
            yield code
            yield "Let's think step by step. The answer is \\boxed{42}. <think> </think> <answer> </answer>"


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Qwen2Tokenizer:
    """Train the byte-level BPE tokenizer offline (deterministic for a given seed)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, CHAT_START, CHAT_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(seed), trainer)
    merges = _merges(backend)
    return Qwen2Tokenizer(
        vocab=backend.get_vocab(),
        merges=merges,
        unk_token=None,
        eos_token=CHAT_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[CHAT_START],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def _merges(backend: Tokenizer) -> list[tuple[str, str]]:
    """Return the trained merges in rank order (the Rust model exposes them via JSON)."""
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **size: int) -> Qwen2ForCausalLM:
    """Build a randomly initialised tiny Qwen2 for ``tokenizer``; ``size`` overrides TinyModelSize.

    Initialisation draws from a forked torch RNG seeded with ``seed``, so it is
    deterministic and leaves the caller's global RNG untouched.
    """
    shape = TinyModelSize(**size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape.__dict__,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def load_default_model(
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the committed warm-up model and its tokenizer from ``DEFAULT_MODEL_DIR``."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{DEFAULT_MODEL_DIR} holds no model; run `python scripts/make_default_model.py`")
    return load_model(str(DEFAULT_MODEL_DIR), dtype=dtype)


def load_model(
    name_or_path: str | None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and tokenizer (``load_tokenizer``): the default model for None, else a hub id or path.

    A LoRA checkpoint folder (peft's files, as ``--lora-rank`` runs write them) loads as a
    plain model: its base (``base_model_name_or_path``) with the adapters merged in, so
    training every weight from it, evaluating it and sampling from it all see one model.
    """
    if name_or_path is None:
        return load_default_model(dtype=dtype)
    if (Path(name_or_path) / "adapter_config.json").is_file():
        return _merged_adapters(name_or_path, dtype), load_tokenizer(name_or_path)
    # A per-tensor "Loading weights" bar is noise for a folder on disk; keep it for downloads.
    restore = Path(name_or_path).is_dir() and hf_logging.is_progress_bar_enabled()
    if restore:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    finally:
        if restore:
            hf_logging.enable_progress_bar()
    return model.eval(), load_tokenizer(name_or_path)


def _merged_adapters(folder: str, dtype: torch.dtype) -> PreTrainedModel:
    """Return the base model of a LoRA checkpoint ``folder`` with its adapters merged into its weights."""
    from peft import PeftModel

    base_name = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{folder}/adapter_config.json names no base_model_name_or_path: cannot load its base model")
    base = load_model(base_name, dtype)[0]
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged.requires_grad_(True).eval()  # peft froze the base's weights; a plain model trains them all


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``load_model`` alone (for a generator that loads its own weights, as vLLM does).

    It pads on the left (generation appends on the right) and falls back to EOS as its
    pad token when it has none (Llama-style tokenizers).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR) if name_or_path is None else name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
