"""Pack episodes into padded tensors for the learner, with loss masks and advantages.

Row i of the batch is ``prompt_i + tokens_i``, right-padded to the longest row. Every
token-level tensor has ``T - 1`` columns, aligned with ``sequence_logprobs``: column t
holds what concerns the *target* token ``input_ids[:, t + 1]`` (predicted from positions
``<= t``). So a token at position p of a row sits in column ``p - 1``, and the prompt's
first token, which nothing predicts, has no column.

``loss_mask`` is 1 exactly on the tokens the model generated; the prompt, the environment's
messages and padding are 0. With ``mask_truncated`` an episode with a turn cut at
``max_new_tokens`` is masked out entirely (DAPO's overlong filtering: its reward says
"unfinished", not "wrong"). ``num_sequences`` and ``num_tokens`` count what remains
trainable in the whole batch, and are what the loss divides by in every micro-batch.

The learner cuts a batch into micro-batches of ``micro_batch_size`` consecutive rows
(``micro_batches``), or, with a token budget, into groups of rows (``select``) whose real
tokens it runs packed without padding (``algorithm/packing.py``); either way the loss
reads the same ``[b, T-1]`` tensors of the rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rlvr.trainer.algorithm.rollout import Episode


@dataclass
class TrainBatch:
    """One optimizer batch (or a micro-batch slice of one)."""

    input_ids: torch.Tensor
    """[B, T] long, prompt + episode tokens, right-padded with the pad id."""
    attention_mask: torch.Tensor
    """[B, T] long, 1 on real tokens."""
    loss_mask: torch.Tensor
    """[B, T-1] float, 1 on target tokens the model generated (and that are not masked out)."""
    advantages: torch.Tensor
    """[B, T-1] float, the advantage of the turn each target token belongs to (0 elsewhere)."""
    behavior_logprobs: torch.Tensor
    """[B, T-1] float, the generator's log mu of each generated target token (0 elsewhere)."""
    num_sequences: int
    """Rows with at least one trainable token, over the whole optimizer batch."""
    num_tokens: int
    """Trainable tokens (``loss_mask.sum()``) over the whole optimizer batch."""
    old_logprobs: torch.Tensor | None = None
    """[B, T-1] log pi_prox, filled in by the learner before its first step (num_iterations > 1)."""
    ref_logprobs: torch.Tensor | None = None
    """[B, T-1] log pi_ref of the frozen reference model, filled in by the learner."""

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def micro_batches(self, size: int) -> Iterator[TrainBatch]:
        """Consecutive slices of ``size`` rows, each trimmed to its longest row.

        ``num_sequences`` / ``num_tokens`` keep the whole batch's counts, so the losses of
        the slices add up to the loss of the batch.
        """
        for rows in self.row_slices(size):
            yield self.select(rows)

    def row_slices(self, size: int) -> list[slice]:
        """Return the rows of consecutive micro-batches of ``size`` rows: the learner's plan without a token budget."""
        return [slice(start, start + size) for start in range(0, self.size, size)]

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> TrainBatch:
        """Rows ``rows`` (a slice, or any subset in that order), trimmed to their longest: one micro-batch.

        Keeps the whole batch's ``num_sequences`` / ``num_tokens``, as ``micro_batches`` does.
        """
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
            if not rows.numel():
                raise ValueError("a micro-batch needs at least one row")
        width = int(self.attention_mask[rows].sum(-1).max().item())  # right padding
        return self._slice(rows, width)

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Rank ``rank``'s contiguous, equal share of the rows, for data-parallel learning.

        Like ``micro_batches``, the shard keeps the whole batch's ``num_sequences`` /
        ``num_tokens``, so the shards' losses add up to the batch loss (and their
        gradients to its gradient). Rows are not trimmed: every rank keeps the batch width.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if self.size % world_size:
            raise ValueError(
                f"a batch of {self.size} rows does not split evenly over {world_size} ranks; "
                f"make prompts_per_step * group_size a multiple of {world_size}"
            )
        if world_size == 1:
            return self
        share = self.size // world_size
        return self._slice(slice(rank * share, (rank + 1) * share), int(self.input_ids.shape[1]))

    def _slice(self, rows: slice | torch.Tensor, width: int) -> TrainBatch:
        def cut(t: torch.Tensor | None, cols: int) -> torch.Tensor | None:
            return None if t is None else t[rows, :cols]

        return TrainBatch(
            input_ids=self.input_ids[rows, :width],
            attention_mask=self.attention_mask[rows, :width],
            loss_mask=self.loss_mask[rows, : width - 1],
            advantages=self.advantages[rows, : width - 1],
            behavior_logprobs=self.behavior_logprobs[rows, : width - 1],
            num_sequences=self.num_sequences,
            num_tokens=self.num_tokens,
            old_logprobs=cut(self.old_logprobs, width - 1),
            ref_logprobs=cut(self.ref_logprobs, width - 1),
        )


def pack_episodes(
    episodes: Sequence[Episode],
    turn_advantages: Sequence[Sequence[float]],
    pad_id: int,
    mask_truncated: bool = False,
) -> TrainBatch:
    """Right-pad episodes into a ``TrainBatch``; ``turn_advantages[i][k]`` is for turn k of episode i."""
    if len(episodes) != len(turn_advantages):
        raise ValueError(f"{len(episodes)} episodes but {len(turn_advantages)} advantage lists")
    width = max(len(e.prompt_ids) + len(e.token_ids) for e in episodes)
    rows = len(episodes)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width - 1))
    advantages = torch.zeros((rows, width - 1))
    behavior = torch.zeros((rows, width - 1))
    for i, (episode, adv) in enumerate(zip(episodes, turn_advantages)):
        if len(adv) != episode.num_turns:
            raise ValueError(f"episode {i} has {episode.num_turns} turns but {len(adv)} advantages")
        p, n = len(episode.prompt_ids), len(episode.token_ids)
        input_ids[i, : p + n] = torch.tensor(episode.prompt_ids + episode.token_ids, dtype=torch.long)
        attention[i, : p + n] = 1
        cols = slice(p - 1, p - 1 + n)  # token k of the episode is target column p - 1 + k
        if not (mask_truncated and episode.length_truncated):
            loss_mask[i, cols] = torch.tensor(episode.loss_mask, dtype=torch.float32)
        advantages[i, cols] = torch.tensor([adv[t] for t in episode.turn_ids], dtype=torch.float32)
        behavior[i, cols] = torch.tensor(episode.logprobs, dtype=torch.float32)
    advantages *= loss_mask  # only trainable tokens carry an advantage
    behavior *= loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
        advantages=advantages,
        behavior_logprobs=behavior,
        num_sequences=int((loss_mask.sum(-1) > 0).sum().item()),
        num_tokens=int(loss_mask.sum().item()),
    )
