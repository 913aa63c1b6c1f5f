"""Teacher-forced per-token log-probabilities (and entropies) of a causal LM.

``sequence_logprobs(model, input_ids, attention_mask)[b, t]`` is
``log softmax(logits[b, t] / temperature)[input_ids[b, t + 1]]``: the log-probability of
token t+1 given tokens <= t. The learner computes pi_theta, pi_prox and pi_ref with it,
and the generators must return the same numbers for the tokens they sample (a test
checks that they agree to 1e-4 in fp32), otherwise importance ratios are wrong from
step one.

Two things trainers get silently wrong, and what this module does about them:

* **Left padding and positions.** Batches are left-padded (prompts of different lengths
  end at the same column so generation can append). Given only an attention mask, a
  transformers forward numbers positions 0..T-1 by column, so a row with 3 pads starts
  its real tokens at position 3. With RoPE that is equal in exact arithmetic (only
  relative positions matter) but not bit-for-bit, and with absolute position
  embeddings it is simply wrong. We pass ``position_ids = cumsum(mask) - 1`` so every
  row starts at position 0, exactly as the generator numbers them.
* **Memory and time.** The logits of a batch are ``[B, T, V]``; with a 150k vocabulary
  that is the largest tensor in training. We run the model body once to get hidden
  states, gather the rows of the positions asked for (``positions``: the learner passes
  its loss mask, so the prompt, the environment's messages and padding never reach the
  head; by default every real target), and apply the LM head chunk by chunk over those
  rows only, keeping just the gathered log-probability (and entropy). On the
  ``arithmetic`` workload 27 of 30 positions are prompt: the head, the log-softmax and
  the entropy were mostly spent on numbers the loss multiplied by 0. With autograd on and
  more than one chunk, each chunk runs under activation checkpointing, so the backward
  pass recomputes a chunk's logits instead of keeping every chunk's ``[chunk, V]``
  softmax alive; a single chunk is kept instead (recomputing it would not lower the
  peak, see ``_chunked``).
* **Padding.** With ``packed=True`` the rows' real tokens run through the body as one
  padding-free sequence, each row at its own positions and attending only to itself
  (``algorithm/packing.py``), and the results come back in the rows' ``[B, T-1]`` layout:
  callers see the same tensors as from a padded pass.
* **Shared prompts.** With a ``prefix`` plan the rows of a group run their common prompt
  through the body once (``algorithm/shared_prefix.py``); same outputs again.

Entropy is of the same tempered distribution: ``H = logsumexp(z) - sum softmax(z) * z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rlvr.trainer.algorithm.packing import PackedRows, packed_hidden_states
from rlvr.trainer.algorithm.shared_prefix import SharedPrefix, scored_targets

DEFAULT_CHUNK_TOKENS = 1024
"""Positions per LM-head chunk: ``[chunk, V]`` float32 logits live at once (4 MiB at V=1k)."""


@dataclass
class TokenLogprobs:
    """Per-token outputs of one teacher-forced pass; position t scores token t+1."""

    logprobs: torch.Tensor
    """log pi(x[t+1] | x[<=t]) under the tempered distribution: [B, T-1], 0 where padded."""
    entropy: torch.Tensor
    """Entropy of the tempered next-token distribution at t: [B, T-1], 0 where padded."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token: [B, T] -> [B, T].

    Pads get position 0 (any value works: they are masked out as keys and their
    outputs are ignored).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    positions: torch.Tensor | None = None,
    recompute_head: bool | None = None,
    packed: bool = False,
    prefix: SharedPrefix | None = None,
) -> torch.Tensor:
    """Teacher-forced log pi(x[t+1] | x[<=t]) for every t: [B, T] -> [B, T-1] float32.

    Differentiable with respect to the model's parameters when autograd is on.
    Positions whose target token is padding are 0. ``positions`` ([B, T-1], nonzero where
    wanted, e.g. a loss mask) limits the LM head to those targets; the others are 0 too.
    ``recompute_head``: see :func:`_chunked` (None, the default, decides by chunk count).
    ``packed``: run the body on the rows packed without padding (right-padded rows only,
    ``algorithm/packing.py``); the output is the same ``[B, T-1]``. ``prefix``: run the body
    through the rows' shared prefixes (``algorithm/shared_prefix.py``), a plan made for these
    rows and ``positions``; the output is the same again.
    """
    return _score(
        model, input_ids, attention_mask, temperature, chunk_tokens, False, positions, recompute_head, packed, prefix
    ).logprobs


def sequence_logprobs_and_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    positions: torch.Tensor | None = None,
    recompute_head: bool | None = None,
    packed: bool = False,
    prefix: SharedPrefix | None = None,
) -> TokenLogprobs:
    """Like :func:`sequence_logprobs`, plus the entropy of each next-token distribution."""
    return _score(
        model, input_ids, attention_mask, temperature, chunk_tokens, True, positions, recompute_head, packed, prefix
    )


def _score(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool,
    positions: torch.Tensor | None = None,
    recompute_head: bool | None = None,
    packed: bool = False,
    prefix: SharedPrefix | None = None,
) -> TokenLogprobs:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    model = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    batch, length = input_ids.shape
    targets = input_ids[:, 1:]  # [B, T-1]
    if positions is not None and positions.shape != targets.shape:
        raise ValueError(f"positions must be [B, T-1] = {tuple(targets.shape)}, got {tuple(positions.shape)}")
    # Score only positions whose target is a real token; pads would waste LM-head work.
    valid = scored_targets(attention_mask, positions)  # [B, T-1]
    # The body alone (no LM head): for a transformers causal LM ``base_model`` is the
    # decoder stack its own forward calls, so hidden states are exactly what it would feed
    # its head, final norm included.
    if packed:
        rows = PackedRows.of(input_ids, attention_mask)
        hidden = packed_hidden_states(model, rows)[0]  # [N, H]
        scored = hidden[rows.target_index(valid)]  # [n, H]
    elif prefix is not None:
        hidden = prefix.hidden_states(model)  # [B, S, H]: the rows after their prefixes
        scored = hidden[prefix.suffix_valid(valid)]  # [n, H], in valid's order
    else:
        hidden = model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state  # [B, T, H]
        scored = hidden[:, :-1][valid]  # [n, H]
    head = _LogitHead(model, temperature, with_entropy)
    lp, ent = _chunked(head, scored, targets[valid], chunk_tokens, recompute_head)  # [n] each
    logprobs = hidden.new_zeros((batch, length - 1), dtype=torch.float32)
    entropy = hidden.new_zeros((batch, length - 1), dtype=torch.float32)
    if lp.numel():
        # masked_scatter fills True positions in row-major order, the order [valid] read them.
        logprobs = logprobs.masked_scatter(valid, lp)
        entropy = entropy.masked_scatter(valid, ent)
    elif torch.is_grad_enabled() and hidden.requires_grad and targets.numel():
        # Nothing scored (every row masked out): still run the head on one row, times 0, so
        # the loss has a graph through every weight and its backward takes part in the
        # gradient collectives of data-parallel ranks (DeepSpeed ZeRO 2/3) like any other.
        zero = sum(x.sum() for x in head(hidden.reshape(-1, hidden.shape[-1])[:1], targets.reshape(-1)[:1])) * 0.0
        logprobs, entropy = logprobs + zero, entropy + zero
    return TokenLogprobs(logprobs=logprobs, entropy=entropy)


def _chunked(
    head: _LogitHead, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, recompute: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``head`` on ``[N, H]`` rows ``chunk_tokens`` at a time; return ``[N]`` log-probs and entropies.

    With autograd on and more than one chunk, each chunk is checkpointed: backward then
    holds one chunk's ``[chunk, V]`` tensors at a time instead of all of them. A single
    chunk is not: its tensors are alive at the start of backward either way (kept from
    forward, or recomputed there while the body's activations are still held), so
    recomputing it would cost a second LM head for no lower peak. ``recompute=True``
    checkpoints every chunk, as before issue 23 (kept for side-by-side benchmarks).
    """
    n = hidden.shape[0]
    if recompute is None:
        recompute = n > chunk_tokens
    recompute = recompute and torch.is_grad_enabled() and hidden.requires_grad
    pieces_lp, pieces_ent = [], []
    for start in range(0, n, chunk_tokens):
        h = hidden[start : start + chunk_tokens]  # [c, H]
        y = targets[start : start + chunk_tokens]  # [c]
        lp, ent = checkpoint(head, h, y, use_reentrant=False) if recompute else head(h, y)
        pieces_lp.append(lp)
        pieces_ent.append(ent)
    if not pieces_lp:
        empty = hidden.new_zeros((0,), dtype=torch.float32)
        return empty, empty
    return torch.cat(pieces_lp), torch.cat(pieces_ent)


class _LogitHead:
    """Hidden states of one chunk -> (logprob of target, entropy), both [N] float32.

    Applies the model's own LM head (a module call, so DeepSpeed ZeRO-3 hooks gather its
    weight) and the logit post-processing some architectures add on top of it.
    """

    def __init__(self, model: torch.nn.Module, temperature: float, with_entropy: bool):
        self.lm_head = model.get_output_embeddings()
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides by it
        self.temperature = temperature
        self.with_entropy = with_entropy

    def __call__(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.lm_head(h).float()  # [N, V]; float32 so logsumexp is exact enough
        if self.logits_scaling:
            z = z / self.logits_scaling
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:  # dividing by 1 would only allocate another [N, V]
            z = z / self.temperature
        lse = z.logsumexp(-1)  # [N]
        lp = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse  # [N]
        if not self.with_entropy:
            return lp, torch.zeros_like(lp)
        # sum_v p_v z_v as a row-wise dot product: no [N, V] product tensor next to p and z.
        ent = lse - torch.linalg.vecdot(z.softmax(-1), z)  # [N]
        return lp, ent
