"""Policy surrogates: what a token's loss is, given its ratio to the old policy and its advantage.

Chosen once at setup by ``TrainConfig.policy_loss``, independently of the staleness
correction (``--objective``: none, AReaL's behaviour weight, or the behaviour policy as the
old one; ``losses.py``), which enters only through the advantages or the old
log-probabilities and so combines with every surrogate here. Each returns per-token values
``[B, T]``; the loss's aggregation (sequence, token or constant mean) is applied after.

With ``r_{i,t} = pi_theta(y_t) / pi_old(y_t)`` and ``A_{i,t}`` the token's advantage:

- ``"clip"`` (PPO, Schulman et al. 2017; GRPO, Shao et al. 2024; asymmetric clip from DAPO,
  Yu et al. 2025): ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.
- ``"gspo"`` (Group Sequence Policy Optimization, Zheng et al. 2025): the ratio is the
  sequence's, length-normalised, ``s_i = exp(1/|y_i| sum_t log r_{i,t})``, clipped per
  sequence: ``-min(s_i A, clip(s_i, 1 - eps_low, 1 + eps_high) A)``. Written as the paper's
  GSPO-token form, ``s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]`` (equal to
  ``s_i`` in value, and a token's gradient is ``s_i`` times its own log-probability's), so
  per-token advantages (multi-turn, the behaviour weight) still apply; with the ``sequence``
  aggregation and one advantage per sequence its gradient is the sequence-level GSPO
  objective's exactly. The paper's clip range is tiny (3e-4 / 4e-4): a sequence ratio moves
  far less than a token ratio.
- ``"cispo"`` (Clipped IS-weight Policy Optimization, MiniMax-M1, 2025): the importance
  weight is clipped and carries no gradient, and multiplies the log-probability:
  ``-sg[clip(r, 1 - eps_low, 1 + eps_high)] A log pi_theta(y_t)``. Unlike ``clip``, no token
  ever loses its gradient; a clipped weight only bounds its size. (MiniMax-M1 clips only
  from above; a large ``eps_low`` does the same here.) The loss value is not comparable to
  the other two (it is scaled by log-probabilities); its gradient at ``r = 1`` is the same
  policy gradient ``-A grad log pi``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

MAX_LOG_RATIO = 20.0
"""exp() of a log-ratio beyond this overflows float32 to inf; ratios are clamped in log
space so that one wild token gives a large but finite loss instead of NaN gradients."""


@dataclass
class SurrogateTerms:
    """The per-token surrogate and where its clip is active."""

    loss: Tensor
    """[B, T] the surrogate's per-token loss."""
    ratio: Tensor
    """[B, T] the ratio the clip looks at (the token's, or its sequence's for GSPO), detached."""
    clipped_low: Tensor
    """[B, T] bool, the ratio is below ``1 - eps_low`` where that changes the gradient."""
    clipped_high: Tensor
    """[B, T] bool, the ratio is above ``1 + eps_high`` where that changes the gradient."""


def _clip_min(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float) -> SurrogateTerms:
    """``-min(ratio A, clip(ratio) A)``; a clip is active where it takes the gradient away."""
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)  # [B, T]
    loss = -torch.minimum(ratio * advantages, clipped * advantages)  # [B, T]
    value = ratio.detach()
    return SurrogateTerms(
        loss=loss,
        ratio=value,
        clipped_low=(value < 1.0 - epsilon_low) & (advantages < 0),
        clipped_high=(value > 1.0 + epsilon_high) & (advantages > 0),
    )


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    mask: Tensor | None = None,
) -> SurrogateTerms:
    """``-min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)`` per token, r = pi/pi_old.

    At r = 1 its gradient is ``-A * grad log pi``: the plain policy gradient. ``mask`` is
    not needed (each token stands alone); it is taken for the common signature.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    return _clip_min(torch.exp(log_ratio), advantages, epsilon_low, epsilon_high)


def gspo_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    mask: Tensor | None = None,
) -> SurrogateTerms:
    """GSPO-token: the length-normalised sequence ratio, clipped per sequence (module docstring)."""
    if mask is None:
        mask = torch.ones_like(logprobs)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
    sequence_log_ratio = ((logprobs - old_logprobs) * mask).sum(-1, keepdim=True) / lengths  # [B, 1]
    log_ratio = sequence_log_ratio.detach() + logprobs - logprobs.detach()  # [B, T], value log s_i
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return _clip_min(ratio, advantages, epsilon_low, epsilon_high)


def cispo_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    epsilon_low: float,
    epsilon_high: float,
    mask: Tensor | None = None,
) -> SurrogateTerms:
    """CISPO: ``-sg[clip(r)] A log pi`` per token; every token keeps a gradient (module docstring)."""
    with torch.no_grad():
        ratio = torch.exp((logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
        weight = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    return SurrogateTerms(
        loss=-weight * advantages * logprobs,
        ratio=ratio,
        clipped_low=ratio < 1.0 - epsilon_low,
        clipped_high=ratio > 1.0 + epsilon_high,
    )


SurrogateFn = Callable[[Tensor, Tensor, Tensor, float, float, "Tensor | None"], SurrogateTerms]

SURROGATES: dict[str, SurrogateFn] = {"clip": clipped_surrogate, "gspo": gspo_surrogate, "cispo": cispo_surrogate}
"""Policy surrogates by name; ``TrainConfig.policy_loss`` picks one once."""
