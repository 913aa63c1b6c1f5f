"""Sampler/learner mismatch: the ratio pi_prox / mu, its corrections, and the metrics logged every step.

The engine that samples (vLLM: its own kernels, often bf16 on a GPU) and the learner (fp32
or bf16 master weights, other kernels) compute different probabilities for the same tokens
under the same weights. Per token t of completion i, with ``pi_prox`` the learner's own
recomputed probability (``LossInputs.old_logprobs``) and ``mu`` the generator's
(``LossInputs.behavior_logprobs``):

    w_{i,t} = pi_prox(y_t) / mu(y_t)                                   (level "token")
    w_{i,t} = prod_s m_{i,s} pi_prox(y_s) / mu(y_s)  on every t of i   (level "sequence")

(the log-ratios are ``losses.IMPORTANCE_LEVELS``, the ones the decoupled objective's weight
uses). A correction turns ``w`` into a weight ``c`` that multiplies each token's policy loss
(``losses.py`` folds it into the advantage: ``c >= 0`` and carries no gradient):

- ``"tis"``, truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training"; their cap is 2): ``c = min(w, C)``.
- ``"mis"``, masked importance sampling: ``c = w`` if ``F <= w <= C`` else 0. Two-sided, it is
  IcePop's ``M(k)`` (Ling Team 2025, "Every Step Evolves", arXiv:2510.18855, Ring-1T: ``k``
  inside ``[alpha, beta]``, 0 outside); one-sided at the sequence level it is the MIS of Liu et
  al. 2025 ("When Speed Kills Stability"), which ``F = 0`` gives here. A masked token still
  counts in the aggregation's denominator (as with the decoupled objective's mask).
- ``"none"``: ``c = 1``, the loss is untouched.

``"auto"`` (``TrainConfig.mismatch_correction``) is resolved once per run, by the generator
(``engines/build.py``): 'tis' with vLLM, 'none' with rlvr's transformers generator, which
samples with the learner's own model in the learner's precision (``w = 1`` up to ~1e-7
rounding; 'none' keeps the asynchronous pipeline at staleness 0 bit-identical to the
synchronous loop).

Logged every step, on or off (``mismatch_metrics``; ``behavior_kl``, the k3 estimate of
KL(pi_prox || mu), is a ``LossOutputs`` field of its own):

- ``mismatch_ratio_max`` / ``mismatch_ratio_min``: the largest / smallest ``w`` (at the level);
- ``mismatch_truncated_fraction``: tokens with ``w > C`` (what 'tis' truncates, or would);
- ``mismatch_masked_fraction``: tokens with ``w`` outside ``[F, C]`` (what 'mis' masks, or would).

So a run with the correction off still says whether turning it on would matter. On a stale
batch of the pipelines ``w`` holds the staleness as well as the engines' disagreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr.trainer.algorithm.surrogates import MAX_LOG_RATIO

Tensor = torch.Tensor

MISMATCH_CORRECTIONS = ("auto", "none", "tis", "mis")
"""``--mismatch-correction`` values; 'auto' is resolved per generator before a loss is built."""
MISMATCH_LEVELS = ("token", "sequence")
"""``--mismatch-level`` values: the keys of ``losses.IMPORTANCE_LEVELS``, which computes them
(this module sits below ``losses.py``, which imports it; a test keeps the two equal)."""

LogRatioFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(old_logprobs, behavior_logprobs, mask) -> [B, T] log w`` (``losses.IMPORTANCE_LEVELS``)."""
CorrectionFn = Callable[[Tensor, float, float], Tensor]
"""``(w [B, T], cap, floor) -> [B, T]`` the weight the loss applies."""


def truncate(ratio: Tensor, cap: float, floor: float) -> Tensor:
    """'tis': ``min(w, C)``; a token far above the cap still learns, with a bounded weight."""
    return ratio.clamp(max=cap)


def mask_outside(ratio: Tensor, cap: float, floor: float) -> Tensor:
    """'mis': ``w`` inside ``[F, C]``, 0 outside: such a token is too far off to trust at all."""
    return torch.where(outside_band(ratio, cap, floor), torch.zeros_like(ratio), ratio)


def keep(ratio: Tensor, cap: float, floor: float) -> Tensor:
    """'none': every weight 1 (only the metrics are computed)."""
    return torch.ones_like(ratio)


CORRECTIONS: dict[str, CorrectionFn] = {"none": keep, "tis": truncate, "mis": mask_outside}
"""Correction by resolved name (not 'auto'); chosen once at setup."""


def outside_band(ratio: Tensor, cap: float, floor: float) -> Tensor:
    """``w < F or w > C``: the tokens 'mis' masks. [B, T] bool."""
    return (ratio < floor) | (ratio > cap)


@dataclass
class MismatchWeights:
    """The sampler/learner ratios of one (micro-)batch and the weight the correction makes of them (detached)."""

    ratio: Tensor
    """[B, T] ``w = pi_prox / mu`` at the level (1 off the mask)."""
    weight: Tensor
    """[B, T] the correction's weight ``c``, 0 off the mask."""
    truncated: Tensor
    """[B, T] bool, ``w > C`` on a trainable token."""
    masked: Tensor
    """[B, T] bool, ``w`` outside ``[F, C]`` on a trainable token."""


def mismatch_weights(
    old_logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    *,
    level: LogRatioFn,
    correct: CorrectionFn,
    cap: float,
    floor: float,
) -> MismatchWeights:
    """``w`` of every token at ``level`` and its corrected weight (``level``, ``correct`` chosen at setup).

    Ratios are taken in log space and clamped (``MAX_LOG_RATIO``), as the decoupled weight is:
    a sequence product of thousands of tokens would overflow otherwise.
    """
    with torch.no_grad():
        log_w = level(old_logprobs, behavior_logprobs, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
        ratio = torch.exp(log_w)  # exactly 1 off the mask: the level functions give log w = 0 there
        on = mask > 0
        return MismatchWeights(
            ratio=ratio,
            weight=correct(ratio, cap, floor) * mask,
            truncated=(ratio > cap) & on,
            masked=outside_band(ratio, cap, floor) & on,
        )


def mismatch_metrics(weights: MismatchWeights, mask: Tensor) -> dict[str, Tensor]:
    """Return the metrics logged every step (module docstring) over this micro-batch's trainable tokens.

    The learners reduce ``*_max`` by max and ``*_min`` by min over micro-batches and ranks, the
    fractions by a token-weighted mean. A micro-batch with no trainable token reports -inf /
    +inf, the identities of max / min, so it never hides the others' extremes (a NaN would).
    """
    on = mask > 0
    count = mask.sum().clamp(min=1.0)
    ratios = weights.ratio[on]  # [N] the trainable tokens'
    empty = ratios.numel() == 0
    inf = torch.full((), float("inf"), dtype=mask.dtype)
    return {
        "mismatch_ratio_max": -inf if empty else ratios.max(),
        "mismatch_ratio_min": inf if empty else ratios.min(),
        "mismatch_truncated_fraction": (weights.truncated.to(mask.dtype) * mask).sum() / count,
        "mismatch_masked_fraction": (weights.masked.to(mask.dtype) * mask).sum() / count,
    }
