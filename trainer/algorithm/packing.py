"""Padding-free micro-batches: episodes packed by a token budget into one sequence each.

    python scripts/train.py --env gsm8k --micro-batch-tokens 4096

With ``--micro-batch-tokens N`` (``TrainConfig.micro_batch_tokens``) the learner groups the
rows of a ``TrainBatch`` so that each group holds at most ``N`` real tokens
(``plan_micro_batches``: first-fit over the rows sorted longest first; a row longer than
``N`` gets a group of its own), and runs each group's model body on the concatenation of
its rows' real tokens, one sequence of ``sum(len_i)`` tokens with no padding at all
(``PackedRows``). On a long-tailed length mix (most completions short, a few at the
generation budget, the usual case in reasoning RL) padding to the longest row is most
of a padded micro-batch's work and memory; packed, the work is the real tokens.

**Each row attends only to itself, at its own positions.** A packed row keeps position
ids ``0..len-1`` and the model is called with ``attention_mask=None`` and those position
ids. ``transformers`` (5.x) reads a restart of the position ids as a sequence boundary:

- sdpa, eager and flex attention: ``masking_utils`` builds the block-diagonal causal mask
  from the position ids (``find_packed_sequence_indices``), so this works on a CPU;
- flash attention 2/3 (a GPU with ``flash-attn`` installed): variable-length kernels. We
  pass the cumulative lengths (``cu_seq_lens_q/k``, ``max_length_q/k``) ourselves, so
  the kernels need not re-derive them from the position ids in every layer. This path is
  written but has not run here (no GPU, no ``flash-attn`` on the development machine).

An attention that does neither (custom or remote code that ignores position ids for the
mask) would let a row attend to the rows before it. ``packed_attention_error`` checks this
once per learner on a tiny probe: two rows packed must give each row the hidden states
it has alone (a leak changes them by O(1)); where they do not, the learner falls back to
padding, grouping rows by the same budget counted as ``rows x longest`` instead, and says
so once in a log line.

**The loss is untouched.** Log-probabilities are computed packed and put back into the
group's ``[b, T-1]`` layout right away (``logprobs.py``), so ``losses.py`` sees the same
tensors as on the padded path; every aggregation divides by whole-batch counts
(``TrainBatch.num_sequences`` / ``num_tokens``), so the groups' losses and gradients add
up to the batch's whatever the grouping, equal to the padded path's to float rounding.

**Data parallel.** Under DeepSpeed with several ranks each rank packs its own shard, and
shards of different lengths would give different numbers of micro-batches; ZeRO 2/3
reduce gradients (and ZeRO-3 gathers parameters) in every micro-batch's passes, which
must line up over ranks. The learner takes the largest count over ranks and
``even_out`` splits a rank's heaviest groups until it has as many (a rank holds as many
rows as any other, so that many groups always exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Relative error allowed between a probe row packed and alone; half precision: 5e-2."""


def plan_micro_batches(lengths: Sequence[int], budget: int, *, padded: bool = False) -> list[list[int]]:
    """Group row indices so each group costs at most ``budget`` tokens (first-fit decreasing).

    Cost: the group's real tokens, or with ``padded`` ``rows x longest row`` (what a padded
    micro-batch computes). Rows go longest first into the first group they fit; a row that
    fits nowhere opens a group, so a row longer than the budget has one of its own. Ties
    keep row order, and each group lists its rows in ascending order: the plan is a pure
    function of the lengths.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    costs: list[int] = []
    for i in order:
        for g, rows in enumerate(groups):
            # Longest first: a padded group's longest row is its first.
            cost = (len(rows) + 1) * lengths[rows[0]] if padded else costs[g] + lengths[i]
            if cost <= budget:
                rows.append(i)
                costs[g] = cost
                break
        else:
            groups.append([i])
            costs.append(lengths[i])
    return [sorted(rows) for rows in groups]


def even_out(groups: list[list[int]], count: int, lengths: Sequence[int]) -> list[list[int]]:
    """Split the groups with the most tokens in two until there are ``count`` of them.

    Used so that every data-parallel rank runs the same number of micro-batches. Each
    split deals the group's rows, longest first, to whichever half has fewer tokens.
    """
    groups = [list(g) for g in groups]
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        if not splittable:
            raise ValueError(f"{len(groups)} rows cannot make {count} micro-batches")
        heaviest = max(splittable, key=lambda g: sum(lengths[i] for i in g))
        halves: tuple[list[int], list[int]] = ([], [])
        for i in sorted(heaviest, key=lambda i: (-lengths[i], i)):
            lighter = min(halves, key=lambda h: sum(lengths[j] for j in h))
            lighter.append(i)
        at = groups.index(heaviest)
        groups[at : at + 1] = [sorted(halves[0]), sorted(halves[1])]
    return groups


@dataclass
class PackedRows:
    """Right-padded rows ``[b, T]`` as one padding-free sequence ``[1, N]``, ``N = sum(len_i)``."""

    input_ids: torch.Tensor
    """[1, N] long: the rows' real tokens, row after row."""
    position_ids: torch.Tensor
    """[1, N] long: ``0..len_i-1`` within each row (the restarts mark the boundaries)."""
    offsets: torch.Tensor
    """[b] long: where each row starts in the packed sequence."""
    cu_seq_lens: torch.Tensor
    """[b + 1] int32: cumulative lengths, as variable-length flash attention takes them."""
    max_length: int
    """The longest row."""

    @classmethod
    def of(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows:
        """Pack right-padded rows (real tokens first, as ``pack_episodes`` builds them)."""
        mask = attention_mask.bool()  # [b, T]
        if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("packing needs right-padded rows, each with at least one real token")
        lengths = mask.sum(-1)  # [b]
        columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [b, T]
        ends = lengths.cumsum(0)
        return cls(
            input_ids=input_ids[mask].unsqueeze(0),
            position_ids=columns[mask].unsqueeze(0),
            offsets=ends - lengths,
            cu_seq_lens=torch.nn.functional.pad(ends, (1, 0)).to(torch.int32),
            max_length=int(lengths.max().item()),
        )

    def target_index(self, valid: torch.Tensor) -> torch.Tensor:
        """Packed index of the position that predicts each target where ``valid`` ([b, T-1]) is True.

        Column t of a row predicts token t+1 from token t, which sits at ``offset + t``;
        the result is in the row-major order of ``valid``, as ``tensor[valid]`` reads.
        """
        columns = torch.arange(valid.shape[1], device=valid.device)
        return (self.offsets.unsqueeze(1) + columns.unsqueeze(0))[valid]  # [n]

    def model_kwargs(self, attn_implementation: str | None) -> dict[str, Any]:
        """Return the body's keyword arguments: no mask (the position ids say where rows restart).

        Flash attention also gets the cumulative lengths, so its variable-length kernel
        is used without re-deriving them from the position ids in every layer.
        """
        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "attention_mask": None,
            "position_ids": self.position_ids,
            "use_cache": False,
        }
        if attn_implementation and "flash" in attn_implementation:
            kwargs.update(
                cu_seq_lens_q=self.cu_seq_lens,
                cu_seq_lens_k=self.cu_seq_lens,
                max_length_q=self.max_length,
                max_length_k=self.max_length,
            )
        return kwargs


def packed_hidden_states(model: torch.nn.Module, rows: PackedRows) -> torch.Tensor:
    """Run the model body on packed rows: its last hidden states, [1, N, H] (``model``: unwrapped)."""
    impl = getattr(model.config, "_attn_implementation", None)
    return model.base_model(**rows.model_kwargs(impl)).last_hidden_state


def packed_attention_error(model: torch.nn.Module, device: torch.device | str) -> str | None:
    """None when ``model`` takes packed rows correctly; otherwise why not (for the fallback's log line).

    Two random rows of 6 and 4 tokens, packed, must give each row the hidden states it
    gets alone (to ``PROBE_TOLERANCE`` relative to their size): a row that attends to the
    row before it, or positions that do not restart, change them by O(1).
    """
    model = getattr(model, "module", model)
    impl = getattr(model.config, "_attn_implementation", None)
    vocab = model.get_input_embeddings().num_embeddings
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=rng).to(device)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], device=device)
    try:
        with torch.no_grad():
            packed = packed_hidden_states(model, PackedRows.of(ids, mask))[0]  # [10, H]
            alone = [
                model.base_model(
                    input_ids=ids[r : r + 1, :n],
                    position_ids=torch.arange(n, device=device).unsqueeze(0),
                    use_cache=False,
                ).last_hidden_state[0]
                for r, n in ((0, 6), (1, 4))
            ]  # [6, H], [4, H]
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        return f"{impl} attention refused packed input ({type(err).__name__}: {err})"
    expected = torch.cat(alone).float()
    error = float((packed.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-6))
    tolerance = PROBE_TOLERANCE.get(packed.dtype, 5e-2)
    if not error <= tolerance:  # also catches NaN
        return (
            f"{impl} attention does not keep packed rows apart (relative error {error:.2g} > {tolerance:g} "
            "between a row packed and alone)"
        )
    return None
