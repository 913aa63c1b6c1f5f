"""The transformers Generator and teacher-forced log-probabilities agree, token for token.

The learner's importance ratios are exp(logprob_learner - logprob_generator); these
tests pin down that both sides compute the same number for the same token (left padding,
temperature and top-p included), and the generator's stopping, seeding and weight
updates. Real tiny Qwen2/Llama models throughout: the committed default model where a
peaked distribution matters (EOS, top-p), random weights elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlvr.trainer.algorithm.chat import encode_chat, render_chat
from rlvr.trainer.algorithm.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from rlvr.trainer.engines.models import (
    TEST_SIZE,
    arithmetic_messages,
    build_tiny_model,
    build_tokenizer,
    load_default_model,
)
from rlvr.trainer.engines.transformers_generator import TransformersGenerator
from rlvr.trainer.protocols import Completion, SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)


@pytest.fixture(scope="module")
def default():
    return load_default_model()


def varied_prompts(tokenizer) -> list[list[int]]:
    """Prompts of very different lengths, so the batch is left-padded."""
    word = "Maria has 12 apples. She buys 7 more. How many apples does she have now?"
    return [
        encode_chat(tokenizer, arithmetic_messages("3+4")),
        encode_chat(tokenizer, [{"role": "user", "content": word}]),
        tokenizer.encode("Hello"),
    ]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def full_logits(model, row: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence from the plain forward: [len, V] float32."""
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0].float()


def teacher_forced(model, completions: list[Completion], temperature: float) -> list[torch.Tensor]:
    """sequence_logprobs of each completion's tokens, computed on a left-padded batch."""
    rows = [c.prompt_ids + c.token_ids for c in completions]
    ids, mask = left_pad(rows, 0)
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, mask, temperature=temperature)  # [B, T-1]
    return [lp[i, lp.shape[1] - len(c.token_ids) :] for i, c in enumerate(completions)]


def flatten(groups: list[list[Completion]]) -> list[Completion]:
    return [c for group in groups for c in group]


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    """Learned absolute positions: wrong position_ids under left padding change the output."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(2)
    return GPT2LMHeadModel(config).eval()


def make_model(arch: str, tokenizer, random_model):
    """RoPE models (qwen2, llama) hide position mistakes up to rounding; gpt2 does not."""
    return {"qwen2": lambda: random_model, "llama": lambda: tiny_llama(tokenizer),
            "gpt2": lambda: tiny_gpt2(tokenizer)}[arch]()  # fmt: skip


# --- sequence_logprobs ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_sequence_logprobs_match_unpadded_full_logits(tokenizer, random_model, arch):
    model = make_model(arch, tokenizer, random_model)
    rows = varied_prompts(tokenizer)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    temperature = 0.7
    with torch.no_grad():
        # chunk_tokens=5 forces several LM-head chunks.
        out = sequence_logprobs_and_entropy(model, ids, mask, temperature=temperature, chunk_tokens=5)
    assert out.logprobs.shape == out.entropy.shape == (len(rows), ids.shape[1] - 1)
    for i, row in enumerate(rows):
        logp = torch.log_softmax(full_logits(model, row) / temperature, -1)[:-1]  # [L-1, V]
        want_lp = logp.gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
        want_ent = -(logp.exp() * logp).sum(-1)
        n = len(row) - 1
        assert (out.logprobs[i, -n:] - want_lp).abs().max() < TOL
        assert (out.entropy[i, -n:] - want_ent).abs().max() < TOL
        # Positions whose target is padding (or the first real token) are exactly 0.
        assert torch.all(out.logprobs[i, :-n] == 0)


def test_sequence_logprobs_gradient_matches_unpadded(tokenizer):
    """The checkpointed chunked LM head backpropagates the same gradient as the plain path."""
    model = build_tiny_model(tokenizer, seed=3, **TEST_SIZE.__dict__)
    rows = varied_prompts(tokenizer)
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    sequence_logprobs(model, ids, mask, temperature=1.3, chunk_tokens=7).sum().backward()
    got = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    total = 0.0
    for row in rows:
        logits = model(torch.tensor([row])).logits[0, :-1].float() / 1.3
        total = total + torch.log_softmax(logits, -1).gather(-1, torch.tensor(row[1:])[:, None]).sum()
    total.backward()
    want = model.get_input_embeddings().weight.grad
    assert got.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


# --- generator logprobs == teacher forcing --------------------------------------------


@pytest.mark.parametrize(
    ("arch", "temperature"),
    [
        pytest.param("qwen2", 1.0, id="qwen2-T=1"),
        pytest.param("qwen2", 0.7, id="qwen2-T=0.7"),
        pytest.param("qwen2", 1.5, id="qwen2-T=1.5"),
        pytest.param("gpt2", 1.0, id="gpt2-T=1"),
    ],
)
def test_generator_logprobs_equal_teacher_forced(tokenizer, random_model, arch, temperature):
    model = make_model(arch, tokenizer, random_model)
    gen = TransformersGenerator(model, tokenizer)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=0)
    completions = flatten(gen.generate(varied_prompts(tokenizer), 2, params))
    for c, tf in zip(completions, teacher_forced(model, completions, temperature)):
        assert len(c.logprobs) == len(c.token_ids) > 0
        assert (torch.tensor(c.logprobs) - tf).abs().max() < TOL


def nucleus_mass(probs: torch.Tensor, token: int, top_p: float) -> tuple[float, bool]:
    """Mass of the top-p nucleus of ``probs`` [V] and whether ``token`` is inside it."""
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]  # mass of strictly more likely tokens
    inside = order[before < top_p]
    return probs[inside].sum().item(), bool((inside == token).any())


@pytest.mark.parametrize(
    ("temperature", "top_p"),
    [pytest.param(1.0, 0.9, id="T=1,top_p=0.9"), pytest.param(1.4, 0.5, id="T=1.4,top_p=0.5")],
)
def test_top_p_logprobs_are_renormalised_nucleus(default, temperature, top_p):
    """Returned = log(p_T(x) / nucleus mass): inside the nucleus, >= the plain tempered logprob."""
    model, tok = default
    gen = TransformersGenerator(model, tok)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, seed=1)
    completions = flatten(gen.generate(varied_prompts(tok), 3, params))
    masses = []
    for c, tf in zip(completions, teacher_forced(model, completions, temperature)):
        row = c.prompt_ids + c.token_ids
        probs = torch.softmax(full_logits(model, row) / temperature, -1)  # [L, V]
        for j, (token, got) in enumerate(zip(c.token_ids, c.logprobs)):
            mass, inside = nucleus_mass(probs[len(c.prompt_ids) - 1 + j], token, top_p)
            assert inside, f"token {token} sampled outside the top-{top_p} nucleus"
            assert abs(got - (tf[j].item() - math.log(mass))) < TOL
            assert got >= tf[j].item() - TOL
            masses.append(mass)
    assert min(masses) < 0.999, "the nucleus never cut anything: the test would be vacuous"


def test_greedy_takes_argmax_with_zero_logprob(tokenizer, random_model):
    gen = TransformersGenerator(random_model, tokenizer)
    prompts = varied_prompts(tokenizer)
    completions = flatten(gen.generate(prompts, 1, SamplingParams(max_new_tokens=6, temperature=0.0)))
    for c in completions:
        logits = full_logits(random_model, c.prompt_ids + c.token_ids)
        argmax = logits[len(c.prompt_ids) - 1 : -1].argmax(-1).tolist()
        assert c.token_ids[: len(argmax)] == argmax[: len(c.token_ids)]
        assert c.logprobs == [0.0] * len(c.token_ids)


# --- stopping -------------------------------------------------------------------------


def test_eos_stops_completion(default):
    model, tok = default
    gen = TransformersGenerator(model, tok)
    prompts = [encode_chat(tok, arithmetic_messages(e)) for e in ("3+4", "9-2", "5+5")]
    completions = flatten(gen.generate(prompts, 4, SamplingParams(max_new_tokens=16, seed=0)))
    for c in completions:
        assert c.finish_reason == "stop"
        assert c.token_ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in c.token_ids[:-1]
        assert c.text == tok.decode(c.token_ids[:-1])  # EOS not in the text
        assert c.text.lstrip("-").isdigit(), c.text


def test_max_new_tokens_cap_gives_length(default):
    model, tok = default
    gen = TransformersGenerator(model, tok)
    prompts = [encode_chat(tok, arithmetic_messages("8+7"))]
    completions = flatten(gen.generate(prompts, 6, SamplingParams(max_new_tokens=1, seed=0)))
    # Every answer needs a digit and then EOS, so one token is never a finished answer.
    assert [(len(c.token_ids), c.finish_reason) for c in completions] == [(1, "length")] * 6


def test_stop_string_stops_and_is_kept(tokenizer, random_model):
    gen = TransformersGenerator(random_model, tokenizer)
    prompts = varied_prompts(tokenizer)[:1]
    free = gen.generate(prompts, 1, SamplingParams(max_new_tokens=20, seed=5))[0][0]
    assert free.finish_reason == "length"
    # A stop string that the unconstrained run produces at its 6th-7th tokens.
    stop = tokenizer.decode(free.token_ids[5:7])
    assert stop.strip(), "pick a seed whose tokens 5-7 decode to visible text"
    stopped = gen.generate(prompts, 1, SamplingParams(max_new_tokens=20, stop=(stop,), seed=5))[0][0]
    assert stopped.finish_reason == "stop"
    assert stop in stopped.text
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) <= 7
    assert stop not in tokenizer.decode(stopped.token_ids[:-1])  # it stopped at the first hit


# --- seeding, structure, weights ------------------------------------------------------


def test_seeded_sampling_is_reproducible(tokenizer, random_model):
    gen = TransformersGenerator(random_model, tokenizer)
    prompts = varied_prompts(tokenizer)

    def ids(seed):
        groups = gen.generate(prompts, 2, SamplingParams(max_new_tokens=8, seed=seed))
        return [c.token_ids for c in flatten(groups)]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)
    # Unseeded calls draw from the generator's own stream, which advances.
    assert ids(None) != ids(None)


def test_groups_follow_prompt_order_across_micro_batches(tokenizer, random_model):
    gen = TransformersGenerator(random_model, tokenizer, max_batch_size=4)
    prompts = varied_prompts(tokenizer)
    groups = gen.generate(prompts, 3, SamplingParams(max_new_tokens=5, seed=0))
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(prompts, groups):
        assert all(c.prompt_ids == prompt and c.version == 0 for c in group)


def test_update_weights_loads_tied_state_dict_and_sets_version(tokenizer):
    model_a = build_tiny_model(tokenizer, seed=0, **TEST_SIZE.__dict__)
    model_b = build_tiny_model(tokenizer, seed=1, **TEST_SIZE.__dict__)
    original = {k: v.clone() for k, v in model_a.state_dict().items()}  # lm_head included
    gen = TransformersGenerator(model_a, tokenizer)
    prompts = varied_prompts(tokenizer)
    params = SamplingParams(max_new_tokens=8, seed=0)
    before = [c.token_ids for c in flatten(gen.generate(prompts, 2, params))]

    # Tied embeddings: the learner may publish the state dict without lm_head.weight.
    state = {k: v.clone() for k, v in model_b.state_dict().items() if k != "lm_head.weight"}
    gen.update_weights(state, version=3)
    after = flatten(gen.generate(prompts, 2, params))
    reference = TransformersGenerator(build_tiny_model(tokenizer, seed=1, **TEST_SIZE.__dict__), tokenizer)
    assert gen.version == 3 and all(c.version == 3 for c in after)
    assert [c.token_ids for c in after] != before
    assert [c.token_ids for c in after] == [c.token_ids for c in flatten(reference.generate(prompts, 2, params))]
    # With lm_head.weight present (and tied) it loads too.
    gen.update_weights(original, version=4)
    assert [c.token_ids for c in flatten(gen.generate(prompts, 2, params))] == before


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda sd: sd.pop("model.norm.weight"), id="missing-key"),
        pytest.param(lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), id="unexpected-key"),
    ],
)
def test_update_weights_rejects_mismatched_keys(tokenizer, random_model, mutate):
    gen = TransformersGenerator(random_model, tokenizer, version=2)
    state = dict(random_model.state_dict())
    mutate(state)
    with pytest.raises(KeyError):
        gen.update_weights(state, version=5)
    assert gen.version == 2


# --- chat -----------------------------------------------------------------------------


def test_encode_chat_renders_chatml(tokenizer):
    messages = arithmetic_messages("3+4")
    text = render_chat(tokenizer, messages)
    assert text == (
        "<|im_start|>system\nAnswer with the final number only.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = encode_chat(tokenizer, messages)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    no_prompt = encode_chat(tokenizer, messages, add_generation_prompt=False)
    assert ids[: len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


def test_encode_chat_without_template_is_a_clear_error(tokenizer):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(bare, arithmetic_messages("1+1"))
