"""A group's shared prompt runs through the model body once, not once per completion.

GRPO samples ``group_size`` completions of each prompt, so the rows of a batch come in
groups that begin with the same tokens. A padded micro-batch runs every row's prompt
again: on the ``arithmetic`` workload 27 of a row's 30 tokens are prompt, so seven
eighths of the body's work in every pass (pi_theta with its backward, pi_ref, pi_prox)
recompute numbers the group's first row already has. Causal attention makes them equal:
a prompt token attends only to the tokens before it, never to the completion after it.

``SharedPrefix.plan`` finds, in one micro-batch, the rows whose tokens before their first
scored target are the same (the *prefix*: the prompt but its last token, or for a
multi-turn episode everything before the first model turn). The body then runs twice:

1. each distinct prefix once (``[G, P]``, right-padded), keeping its keys and values in a
   ``transformers`` cache, with autograd on when the caller's is;
2. every row's rest (``[B, S]``, right-padded, positions continuing from its prefix) with
   the cache selected row by row (``Cache.batch_select_indices``, an indexing, so the
   backward pass sums the rows' gradients into their prefix's keys and values).

Every hidden state the LM head reads comes from the second run (the prefix stops before
the first scored target's predicting position), so the log-probabilities and gradients
are the padded pass's, to float rounding. This is the idea of "Prefix Grouper" (Liu et al.,
arXiv 2506.05433), which does it with a custom attention mask; going through the model's
own cache instead keeps every attention implementation's masking (sdpa, eager, flex and
flash attention's padding) as the model itself does it for generation.

Where it does not apply, the padded pass runs as before: a micro-batch with no two rows
sharing a prefix (nothing to save), packed micro-batches (``--micro-batch-tokens``: the
packed sequence has no per-row cache), the full-logits benchmark path, and a model that
fails ``shared_prefix_error``'s probe (a cache it does not extend like the body would,
e.g. one that drops keys): the learner then says so once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr.trainer.algorithm.packing import PROBE_TOLERANCE


@dataclass
class SharedPrefix:
    """One micro-batch's rows as distinct prefixes ``[G, P]`` plus each row's rest ``[B, S]``."""

    prefix_ids: torch.Tensor
    """[G, P] long: each distinct prefix once, right-padded."""
    prefix_mask: torch.Tensor
    """[G, P] long: 1 on the prefixes' real tokens."""
    owner: torch.Tensor
    """[B] long: the prefix (row of ``prefix_ids``) each row begins with."""
    start: torch.Tensor
    """[B] long: the length of each row's prefix, i.e. the column where its rest begins."""
    suffix_ids: torch.Tensor
    """[B, S] long: each row's tokens from ``start`` on, right-padded."""
    suffix_mask: torch.Tensor
    """[B, S] long: 1 on the rests' real tokens."""

    @classmethod
    def plan(
        cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor | None
    ) -> SharedPrefix | None:
        """Plan right-padded rows ``[B, T]`` scored where ``positions`` ``[B, T-1]`` is nonzero; None: no gain.

        ``positions`` is what the log-prob functions take (the learner's loss mask). A
        row's prefix is its tokens before the first position whose target is scored
        (column t is read from the hidden state at position t), and at most all but its
        last token; rows share a prefix when those tokens are identical. None when no two
        rows share one, or a row cannot have one (a single token, a target scored at
        position 0, rows that are not right-padded).
        """
        valid = scored_targets(attention_mask, positions)
        mask = attention_mask.bool()
        lengths = mask.sum(-1)  # [B]
        columns = torch.arange(mask.shape[1], device=mask.device)
        if input_ids.shape[0] < 2 or not torch.equal(mask, columns < lengths.unsqueeze(1)):
            return None
        first = torch.where(valid.any(-1), valid.int().argmax(-1), lengths - 1)  # argmax: first True
        start = torch.minimum(first, lengths - 1)  # [B]
        if int(start.min()) < 1:
            return None
        keys: dict[bytes, int] = {}
        owners, leaders = [], []
        for row, (tokens, n) in enumerate(zip(input_ids.cpu().numpy(), start.tolist())):
            key = tokens[:n].tobytes()
            if key not in keys:
                keys[key] = len(leaders)
                leaders.append(row)
            owners.append(keys[key])
        if len(leaders) == len(owners):
            return None  # every prefix distinct: two body calls for no saving
        device = input_ids.device
        owner = torch.tensor(owners, device=device)
        leader = torch.tensor(leaders, device=device)
        width = int(start.max())
        prefix_mask = (columns[:width] < start[leader].unsqueeze(1)).long()  # [G, P]
        rest = lengths - start  # [B], >= 1
        shifted = (start.unsqueeze(1) + columns[: int(rest.max())]).clamp(max=mask.shape[1] - 1)  # [B, S]
        suffix_mask = (columns[: shifted.shape[1]] < rest.unsqueeze(1)).long()
        return cls(
            prefix_ids=input_ids[leader, :width] * prefix_mask,
            prefix_mask=prefix_mask,
            owner=owner,
            start=start,
            suffix_ids=input_ids.gather(1, shifted) * suffix_mask,
            suffix_mask=suffix_mask,
        )

    @property
    def saved_fraction(self) -> float:
        """Return the share of the padded pass's real tokens that this plan does not run."""
        whole = int((self.start + self.suffix_mask.sum(-1)).sum())
        return 1.0 - (int(self.prefix_mask.sum()) + int(self.suffix_mask.sum())) / max(whole, 1)

    def hidden_states(self, model: torch.nn.Module) -> torch.Tensor:
        """Run the body (``model.base_model``; ``model`` unwrapped) as planned: the rests' hidden states, [B, S, H]."""
        body = model.base_model
        prefix = body(
            input_ids=self.prefix_ids,
            attention_mask=self.prefix_mask,
            position_ids=torch.arange(self.prefix_ids.shape[1], device=self.prefix_ids.device).expand_as(
                self.prefix_ids
            ),
            use_cache=True,
        )
        cache = prefix.past_key_values
        cache.batch_select_indices(self.owner)  # [G, ...] -> [B, ...], differentiable indexing
        columns = torch.arange(self.suffix_ids.shape[1], device=self.suffix_ids.device)
        return body(
            input_ids=self.suffix_ids,
            attention_mask=torch.cat([self.prefix_mask[self.owner], self.suffix_mask], dim=1),
            position_ids=self.start.unsqueeze(1) + columns,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state

    def suffix_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """Move ``valid`` ``[B, T-1]`` into the rests' layout ``[B, S]`` (column t -> t - start).

        ``hidden[suffix_valid]`` then reads the scored positions in the row-major order
        ``padded_hidden[:, :-1][valid]`` reads them. Refuses a ``valid`` with a scored
        position inside a prefix (not the one the plan was made for).
        """
        columns = torch.arange(valid.shape[1], device=valid.device)
        if (valid & (columns < self.start.unsqueeze(1))).any():
            raise ValueError("a scored position lies inside a shared prefix: the plan was made for other targets")
        shifted = self.start.unsqueeze(1) + torch.arange(self.suffix_ids.shape[1], device=valid.device)  # [B, S]
        inside = shifted < valid.shape[1]
        return valid.gather(1, shifted.clamp(max=valid.shape[1] - 1)) & inside


def scored_targets(attention_mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Return the targets a pass scores, [B, T-1] bool: real tokens predicted from real ones, within ``positions``."""
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return valid if positions is None else valid & positions.bool()


def shared_prefix_error(model: torch.nn.Module, device: torch.device | str) -> str | None:
    """None when ``model`` gives a row's rest the same hidden states through a shared prefix; else why not.

    Three random rows, two sharing a 5-token prefix and one with its own, of ragged
    lengths: the rests' hidden states through ``SharedPrefix`` must equal the padded
    pass's (to ``PROBE_TOLERANCE`` relative to their size).
    """
    model = getattr(model, "module", model)
    impl = getattr(model.config, "_attn_implementation", None)
    vocab = model.get_input_embeddings().num_embeddings
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=rng)
    ids[1, :5] = ids[0, :5]
    mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 8 + [0]])
    positions = torch.zeros(3, 8)
    positions[:, 5:] = 1
    ids, mask = ids.to(device), mask.to(device)
    valid = scored_targets(mask, positions.to(device))
    plan = SharedPrefix.plan(ids, mask, positions.to(device))
    if plan is None:  # the plan's own rules: not the model's doing
        raise AssertionError("the shared-prefix probe's rows must share a prefix")
    try:
        with torch.no_grad():
            shared = plan.hidden_states(model)[plan.suffix_valid(valid)]  # [n, H]
            padded = model.base_model(
                input_ids=ids * mask,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
            ).last_hidden_state[:, :-1][valid]
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError) as err:
        return f"{impl} attention refused a shared prefix's cache ({type(err).__name__}: {err})"
    error = float((shared.float() - padded.float()).abs().max() / padded.float().abs().max().clamp(min=1e-6))
    tolerance = PROBE_TOLERANCE.get(shared.dtype, 5e-2)
    if not error <= tolerance:  # also catches NaN
        return (
            f"{impl} attention gives other numbers through a shared prefix (relative error {error:.2g} > {tolerance:g})"
        )
    return None
