"""The default model: its offline tokenizer, the committed weights, and what they can do.

The committed folder is loaded through AutoModelForCausalLM / AutoTokenizer (the hub
code path), so these tests also pin the transformers behaviour it relies on: a folder
whose config says ``qwen2`` gets ``Qwen2Tokenizer``, which rebuilds the pre-tokenizer
from its own rules, and token ids must not change across that round trip.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from rlvr.envs.registry import make_env
from rlvr.trainer.algorithm.chat import encode_chat
from rlvr.trainer.engines.models import (
    DEFAULT_MODEL_DIR,
    TEST_SIZE,
    arithmetic_messages,
    build_tiny_model,
    build_tokenizer,
    load_default_model,
    load_model,
)
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import SamplingParams

ROUND_TRIP_TEXTS = {
    "arithmetic": "What is 12345+678-9*10?",
    "word-problem": "Natalia sold clips to 48 of her friends in April, and then she sold half as many.",
    "unicode": "Café naïve — 北京 ½ ünïcödé 🙂",
    "whitespace": "a  b\t\tc\n\n\n  d   \r\n e ",
    "code": 'def f(x):\n    return x ** 2  # square\n\nassert f(3) == 9\nprint("ok")',
    "numbers": "$1,234.56 and 3.14159, -42, 1e-9, 0x1F, 10%",
    "contractions": "I'm sure it's what they've said; we'll see, you'd agree.",
    "special-inline": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "tags": "<think>step 1</think><answer>\\boxed{7}</answer>\n#### 7",
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def reloaded(tokenizer, tmp_path_factory):
    """The tokenizer saved beside a qwen2 config and reloaded by AutoTokenizer."""
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", list(ROUND_TRIP_TEXTS.values()), ids=list(ROUND_TRIP_TEXTS))
def test_token_ids_survive_save_and_auto_reload(tokenizer, reloaded, text):
    assert type(reloaded).__name__ == "Qwen2Tokenizer"
    ids = tokenizer.encode(text)
    assert reloaded.encode(text) == ids
    assert reloaded.decode(ids) == tokenizer.decode(ids)


def test_chat_template_survives_round_trip(tokenizer, reloaded):
    messages = arithmetic_messages("7-9") + [{"role": "assistant", "content": "-2"}]
    assert encode_chat(reloaded, messages) == encode_chat(tokenizer, messages)
    assert encode_chat(reloaded, messages[:2]) == encode_chat(tokenizer, messages[:2])


def test_special_tokens_follow_chatml(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None  # like Qwen2: prompts start with <|im_start|>
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("<|im_start|>") == [start]
    assert 500 <= len(tokenizer) <= 2000


@pytest.mark.parametrize("number", ["7", "42", "1234567890", "-305"])
def test_every_digit_is_its_own_token(tokenizer, number):
    tokens = tokenizer.tokenize(number)
    assert [t for t in tokens if any(ch.isdigit() for ch in t)] == [ch for ch in number if ch.isdigit()]


def test_build_tokenizer_is_deterministic_and_matches_committed(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    committed = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    assert committed.get_vocab() == tokenizer.get_vocab()
    text = ROUND_TRIP_TEXTS["word-problem"]
    assert committed.encode(text) == tokenizer.encode(text)


def test_build_tiny_model_is_deterministic(tokenizer):
    rng_state = torch.random.get_rng_state()
    a = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__).state_dict()
    b = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__).state_dict()
    c = build_tiny_model(tokenizer, seed=1, **TEST_SIZE.__dict__).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # caller's RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_committed_model_loads_through_auto_classes():
    model, tok = load_default_model()
    assert isinstance(model, Qwen2ForCausalLM)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    # load_model(None) is the default; a local path goes through the same hub code path.
    assert isinstance(load_model(None)[0], Qwen2ForCausalLM)
    by_path = AutoModelForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.bfloat16)
    assert by_path.dtype == torch.bfloat16


def test_warmup_prompt_is_the_arithmetic_env_prompt():
    env = make_env("arithmetic")
    for index in range(5):
        messages, info = env.reset(options={"index": index})
        expression = messages[-1]["content"].removeprefix("What is ").removesuffix("?")
        assert messages == arithmetic_messages(expression)


def arithmetic_reward(model, tok, temperature: float, n: int = 100) -> float:
    """Mean arithmetic-env reward of one sample per task (tasks 0..n-1, env seed 0)."""
    env = make_env("arithmetic")
    prompts, infos = [], []
    for index in range(n):
        messages, info = env.reset(options={"index": index})
        prompts.append(encode_chat(tok, messages))
        infos.append(info)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=0)
    groups = TransformersGenerator(model, tok).generate(prompts, 1, params)
    total = 0.0
    for index, group in enumerate(groups):
        env.reset(options={"index": index})
        total += env.step(group[0].text)[1]
    return total / n


def test_default_model_solves_some_arithmetic_but_not_all():
    """The warm-up's design point: right about a quarter of the time at temperature 1."""
    model, tok = load_default_model()
    sampled = arithmetic_reward(model, tok, temperature=1.0)
    greedy = arithmetic_reward(model, tok, temperature=0.0)
    random_weights = arithmetic_reward(build_tiny_model(tok, seed=0), tok, temperature=1.0)
    print(f"\nreward at T=1 {sampled:.2f}, greedy {greedy:.2f}, random weights {random_weights:.2f}")
    assert 0.1 <= sampled <= 0.45
    assert greedy >= 0.5
    assert random_weights < 0.05
