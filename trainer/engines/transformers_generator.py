"""The transformers Generator: our own sampling loop over a KV cache.

Why not ``model.generate``: the trainer needs, for every sampled token, the
log-probability under the distribution it was actually drawn from, and it needs that
number to agree with what the learner computes by teacher forcing
(:func:`rlvr.trainer.algorithm.logprobs.sequence_logprobs`). Owning the loop makes that exact:

* prompts are left-padded and ``position_ids = cumsum(mask) - 1``, the same numbering
  ``sequence_logprobs`` uses, so a padded row computes what it would alone;
* logits are taken in float32 and divided by the temperature; top-p keeps the smallest
  set of tokens (in descending probability) whose mass reaches ``top_p`` and
  renormalises, so a returned logprob is ``log(p_T(x) / mass)`` with ``p_T`` the
  tempered softmax (with ``top_p = 1`` it equals the teacher-forced value);
* ``temperature = 0`` means greedy decoding, with logprob 0 (the argmax distribution
  puts probability 1 on its token); trainers should not learn from greedy samples;
* a completion ends at an EOS token (kept in ``token_ids``), once its decoded text
  contains a stop string (the text may run a few characters past the stop string when
  one token straddles it; ``text`` is always ``decode(token_ids)`` so the learner
  trains on exactly what was sampled), or after ``max_new_tokens`` ('length').

Seeding: ``SamplingParams.seed`` makes a call reproducible (a fresh ``torch.Generator``
seeded with it); otherwise draws come from the generator's own stream, seeded once at
construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlvr.trainer.algorithm.logprobs import position_ids_from_mask
from rlvr.trainer.engines import lora
from rlvr.trainer.protocols import Completion, FinishReason, SamplingParams


@dataclass
class _Batch:
    """Left-padded rows of one forward batch."""

    input_ids: torch.Tensor
    """[rows, prompt_len] token ids, pads on the left."""
    attention_mask: torch.Tensor
    """[rows, prompt_len] 1 for real tokens, 0 for pads."""
    prompts: list[list[int]]
    """The unpadded prompt of each row."""


class TransformersGenerator:
    """Samples completions from a transformers causal LM; implements ``Generator``."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        version: int = 0,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
        seed: int = 0,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.version = version
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._rng = torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """Return ``n`` completions for each prompt, in prompt order."""
        check_request(prompts, n, params)
        rng = self._rng
        if params.seed is not None:
            rng = torch.Generator(device=self.device).manual_seed(params.seed)
        rows = [list(p) for p in prompts for _ in range(n)]  # prompt-major, n per prompt
        flat: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            batch = self._pad(rows[start : start + self.max_batch_size])
            flat.extend(self._sample_batch(batch, params, rng))
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load full weights by name and set ``version``.

        Tied parameters (the LM head sharing the embedding) may be given under either
        name or both; any other missing or unexpected key is an error, because silently
        keeping stale weights would make every importance ratio wrong. A model with LoRA
        adapters (``engines/lora.py``) takes its adapters only, in place.
        """
        own = lora.receivable_state(self.model)
        aliases: dict[int, set[str]] = {}
        for name, tensor in own.items():
            aliases.setdefault(tensor.data_ptr(), set()).add(name)
        missing = [sorted(names) for names in aliases.values() if not names & state_dict.keys()]
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"update_weights: missing {missing}, unexpected {unexpected}")
        self.model.load_state_dict(dict(state_dict), strict=False)
        self.version = version

    def _pad(self, rows: list[list[int]]) -> _Batch:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return _Batch(ids.to(self.device), mask.to(self.device), rows)

    def _sample_batch(self, batch: _Batch, params: SamplingParams, rng: torch.Generator) -> list[Completion]:
        """Run the decode loop for one padded batch: prefill, then one token per step."""
        mask = batch.attention_mask  # [R, P]
        rows = mask.shape[0]
        out = self.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        next_pos = mask.sum(-1, keepdim=True)  # [R, 1] position of the next token
        tokens: list[list[int]] = [[] for _ in range(rows)]  # sampled so far, per row
        logprobs: list[torch.Tensor] = []  # each [R]
        finish: list[FinishReason | None] = [None] * rows
        for _ in range(params.max_new_tokens):
            # Rows that already finished keep sampling (their draws are discarded), so
            # the random stream consumed per step, and thus seeded output, does not
            # depend on when other rows stop.
            token, logprob = sample_next(out.logits[:, -1], params, rng)  # [R], [R]
            logprobs.append(logprob)
            for i, t in enumerate(token.tolist()):
                if finish[i] is None:
                    tokens[i].append(t)
                    finish[i] = self._finished(tokens[i], params)
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
            out = self.model(
                input_ids=token.unsqueeze(-1),
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_pos = next_pos + 1
        all_logprobs = torch.stack(logprobs, dim=1).tolist()  # [R, steps]
        completions = []
        for i, ids in enumerate(tokens):
            completions.append(
                Completion(
                    prompt_ids=batch.prompts[i],
                    token_ids=ids,
                    logprobs=all_logprobs[i][: len(ids)],
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason=finish[i] or "length",
                    version=self.version,
                )
            )
        return completions

    def _finished(self, ids: list[int], params: SamplingParams) -> FinishReason | None:
        """Return 'stop' if the completion ``ids`` just hit EOS or a stop string, else None."""
        if ids[-1] in self.eos_ids and not params.ignore_eos:
            return "stop"
        if params.stop:
            # A stop string can span several tokens, and a byte-level token can be a
            # single byte of a character: 4 tokens per character (plus the new one)
            # always cover a stop string that ends in the newest token. Earlier
            # occurrences cannot exist: we would have stopped there.
            window = 4 * max(len(s) for s in params.stop) + 1
            tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True)
            if any(s in tail for s in params.stop):
                return "stop"
        return None


def check_request(prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> None:
    """Raise ``ValueError`` on a request no generator can serve (shared by every ``Generator``)."""
    if params.temperature < 0 or not 0 < params.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {params}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if any(not s for s in params.stop):
        raise ValueError(f"stop strings must be non-empty, got {params.stop!r}")
    if n < 1:
        raise ValueError(f"need n >= 1 completions per prompt, got {n}")


def sample_next(
    logits: torch.Tensor, params: SamplingParams, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from tempered, top-p truncated logits.

    Returns ``(token [R], logprob [R])`` where logprob is under the distribution drawn
    from. ``temperature == 0`` is greedy (logprob 0).
    """
    logits = logits.float()  # [R, V]
    if params.temperature == 0:
        return logits.argmax(-1), logits.new_zeros(logits.shape[0])
    logp = torch.log_softmax(logits / params.temperature, dim=-1)  # [R, V]
    if params.top_p < 1:
        logp = nucleus_logprobs(logp, params.top_p)
    token = torch.multinomial(logp.exp(), 1, generator=rng).squeeze(-1)  # [R]
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def nucleus_logprobs(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalised log-probabilities of the top-p nucleus, -inf outside it: [R, V].

    The nucleus is the shortest prefix of tokens sorted by descending probability whose
    mass reaches ``top_p``; the most likely token is always in it.
    """
    sorted_logp, order = logp.sort(dim=-1, descending=True)  # [R, V]
    probs = sorted_logp.exp()
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop = mass_before >= top_p
    drop[:, 0] = False
    sorted_logp = sorted_logp.masked_fill(drop, float("-inf"))
    kept = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
    return kept - kept.logsumexp(-1, keepdim=True)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids from the tokenizer and the generation config (chat models often list two)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    cfg_eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(int(i) for i in cfg_eos)
    if not ids:
        raise ValueError("the tokenizer and generation config name no EOS token")
    return ids
