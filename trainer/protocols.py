"""The seams of the trainer: typed records, the Generator / Learner protocols, the generator side's error.

Everything that crosses a role boundary is one of these records, so the synchronous loop,
the two-process pipeline and the Ray cluster (separate processes, vLLM, DeepSpeed) plug
into the same seams. Protocols, not base classes: a vLLM generator and a transformers
generator share no code, only this contract. This module imports nothing of rlvr: it is
the bottom of the layers (README, "Architecture").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. One object per generation call, shared by every generator."""

    max_new_tokens: int = 64
    """Hard cap on generated tokens per completion; hitting it gives finish_reason 'length'."""
    temperature: float = 1.0
    """Softmax temperature; logprobs are those of the tempered (sampled-from) distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass; logprobs are those of the renormalised truncated distribution."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation of a completion ends once its text contains one (it is kept)."""
    seed: int | None = None
    """Seed for this call's sampling; None draws from the generator's own stream."""
    ignore_eos: bool = False
    """Keep sampling past EOS (until max_new_tokens), for benchmarks of equal lengths."""


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``logprobs[i]`` is log mu(token_ids[i] | prompt, token_ids[:i]) under the distribution
    actually sampled from (temperature and top-p applied), so importance ratios against
    the learner are exact when the learner uses the same temperature.
    """

    prompt_ids: list[int]
    """The prompt tokens, unpadded: [prompt_len]."""
    token_ids: list[int]
    """The generated tokens, EOS included when the model emitted it: [completion_len]."""
    logprobs: list[float]
    """Behaviour-policy log-probability of each generated token: [completion_len]."""
    text: str
    """The decoded completion (special tokens skipped)."""
    finish_reason: FinishReason
    """'stop' (EOS or stop string) or 'length' (max_new_tokens reached)."""
    version: int
    """Policy version of the weights that sampled it."""


class Generator(Protocol):
    """Samples completions and takes new weights. Implementations: transformers, vLLM."""

    version: int

    def generate(self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        """Return ``n`` completions for each prompt (prompt token ids), in prompt order."""
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load new policy weights (full, unsharded, by parameter name) and set ``version``."""
        ...


class Learner(Protocol):
    """Takes optimizer steps on batches of rollouts. Implementations: torch, DeepSpeed, Ray's rank group.

    The objective is chosen when the learner is built (``algorithm/losses.Objective``).
    """

    version: int

    def step(self, batch: Any, on_policy: bool = False) -> dict[str, float]:
        """One optimizer step (or ``num_iterations`` of them) on a batch; returns metrics.

        ``on_policy``: the batch was sampled by the weights being learned from (staleness 0),
        so the objective's on-policy loss applies. With several data-parallel ranks under a
        launcher, ``batch`` is this rank's share and the metrics are the whole batch's.
        """
        ...

    def weights_for_generation(self) -> dict[str, torch.Tensor]:
        """Full weights by name, ready for ``Generator.update_weights``.

        Collective with several ranks (ZeRO-3 gathers the shards); only rank 0 gets them.
        """
        ...

    def save(self, path: str) -> None:
        """Write model, optimizer and version to ``path`` (collective with several ranks)."""
        ...

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote (collective with several ranks)."""
        ...


class GeneratorError(RuntimeError):
    """The generator side of a pipeline failed: a generator process or actor raised an error, or died."""

    def __init__(self, message: str, *, exitcode: int | None = None, remote_traceback: str = ""):
        super().__init__(message)
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback

    @property
    def reported(self) -> bool:
        """Whether the child reported an exception (as opposed to dying silently)."""
        return bool(self.remote_traceback)
