"""The GRPO objective as pure tensor functions, chosen once at setup.

Per token t of completion i (only tokens the model generated; ``m_{i,t}`` is the loss mask):

    rho_{i,t}  = pi_theta(y_t) / pi_prox(y_t)                       (importance ratio)
    L^clip_{i,t} = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
    k3_{i,t}   = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1        (>= 0, Schulman 2020)
    l_{i,t}    = L^clip_{i,t} + beta * k3_{i,t}

and the loss aggregates ``l`` over the batch in one of three ways (``AGGREGATIONS``):

- ``"sequence"``: ``1/B sum_i 1/|y_i| sum_t m l`` -- mean per sequence, then over
  sequences (GRPO, Shao et al. 2024); long answers get less weight per token.
- ``"token"``: ``sum_{i,t} m l / sum_{i,t} m`` -- every token weighs the same (DAPO, Yu
  et al. 2025).
- ``"constant"``: ``sum_{i,t} m l / (B * L)`` with a fixed ``L`` (the generation budget)
  -- no length normalisation at all (Dr. GRPO, Liu et al. 2025).

Each aggregation divides by batch-wide counts carried in ``LossInputs`` (``num_sequences``,
``num_tokens``), not by those of the micro-batch at hand, so the gradients of the
micro-batches of one optimizer step add up to exactly the gradient of the whole batch.

``pi_prox`` (``old_logprobs``) is the learner's own policy before its step, recomputed by
the learner; ``mu`` (``behavior_logprobs``) is the policy that sampled, as reported by the
generator. ``OBJECTIVES`` holds three ways to use them:

- ``"grpo"``: the surrogate on ``pi_theta / pi_prox``; ``mu`` only feeds a diagnostic, the
  k3 divergence between sampler and learner (~0 when they hold the same weights).
- ``"decoupled"`` (AReaL, Fu et al. 2025): the same surrogate, each token weighted by the
  behaviour importance weight ``w = pi_prox / mu`` (constant, no gradient), capped at ``C``:

      l_{i,t} = w_{i,t} * L^clip_{i,t}(pi_theta / pi_prox) + beta * k3_{i,t}

  ``w`` is per token (``"token"``) or the sequence's product of token ratios
  ``exp(sum_t m (log pi_prox - log mu))`` given to each of its tokens (``"sequence"``);
  beyond ``C`` it is truncated to ``C`` (``"truncate"``, truncated IS) or set to 0
  (``"mask"``, AReaL's choice; masked tokens still count in the aggregation's
  denominator, as in AReaL). Since ``w >= 0`` it folds into the advantage:
  ``w * -min(rho A, clip(rho) A) = -min(rho (wA), clip(rho) (wA))``.
- ``"plain"``: the surrogate on ``pi_theta / mu`` (``mu`` as the old policy, as PPO-style
  asynchronous trainers do), for comparison; its clip acts on the staleness itself.

With fresh samples (``mu == pi_prox``) all three are the same loss. A batch sampled by the
very weights being learned from (staleness 0) is declared ``on_policy`` by the trainer:
``mu`` *is* ``pi_prox`` then, and their log-probabilities differ only by float rounding
between the generator's cached decoding and the learner's forward (~1e-7), so the weight
is set to exactly 1 (and ``plain`` takes its ratio against ``pi_prox``): every objective is
then GRPO's loss bit for bit, and asynchronous training with staleness bound 0 reproduces
the synchronous loop exactly. The measured ``pi_prox / mu`` is still logged.

**The sampler/learner mismatch correction** (``mismatch.py``; ``--mismatch-correction``
'tis', 'mis' or 'none'; 'auto' is resolved per generator before a loss is built) weighs each
token's policy loss by ``c(pi_prox / mu)``, folded into the advantage like the decoupled
weight (the KL and entropy terms are not weighted). It weighs every batch whose loss does not
already account for ``mu``: every batch of ``grpo``, and the on-policy batches of
``decoupled`` and ``plain``. Their stale batches already do (``decoupled`` weighs by
``pi_prox / mu``, ``plain`` takes its ratio against ``mu``), and weighing them again would
count the gap twice. So on a batch at staleness 0 every objective still takes the same loss,
corrected or not, and the pipeline at ``--max-staleness 0`` still equals the synchronous loop.
With 'none' the loss is untouched, bit for bit. Its metrics (``mismatch_ratio_max`` /
``_min``, ``mismatch_truncated_fraction``, ``mismatch_masked_fraction``) are logged with
every objective, on or off.

Departures from AReaL: the cap may truncate instead of mask (default: truncate at 5;
AReaL masks tokens beyond an optional cap, none by default); the weight may be per
sequence; on-policy batches are not reweighted by the decoupled weight (AReaL always
applies it, which with a different inference engine also corrects that mismatch): they take
the mismatch correction above instead, with its own cap and band.

Departures from the GRPO paper: the KL term uses the k3 estimator as the paper does, but
the ratio clip is asymmetric (``epsilon_low`` / ``epsilon_high``, from DAPO; equal values
give the paper's symmetric clip), and the aggregation is a choice rather than fixed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rlvr.trainer.algorithm.mismatch import CORRECTIONS, MismatchWeights, mismatch_metrics, mismatch_weights
from rlvr.trainer.algorithm.surrogates import MAX_LOG_RATIO, SURROGATES, SurrogateFn, clipped_surrogate

Tensor = torch.Tensor


@dataclass
class LossInputs:
    """Everything the objective needs, as token-level tensors of one (micro-)batch.

    Column t of every ``[B, T]`` tensor refers to the same target token; padding and
    tokens not generated by the model (prompt, environment messages) have ``loss_mask`` 0.
    """

    logprobs: Tensor
    """[B, T] log pi_theta of each target token under the current weights (carries grad)."""
    old_logprobs: Tensor
    """[B, T] log pi_prox: the learner's policy before this generation batch's first step."""
    behavior_logprobs: Tensor
    """[B, T] log mu: the sampling policy's log-probabilities, as the generator reported."""
    advantages: Tensor
    """[B, T] advantage of the episode (or of the turn) each token belongs to."""
    loss_mask: Tensor
    """[B, T] float, 1 on tokens to train on, 0 on prompt, environment tokens and padding."""
    ref_logprobs: Tensor | None = None
    """[B, T] log pi_ref of the frozen reference model; None when beta = 0."""
    num_sequences: int | None = None
    """Sequences in the whole optimizer batch (defaults to B: no micro-batching)."""
    num_tokens: int | None = None
    """Trainable tokens in the whole optimizer batch (defaults to ``loss_mask.sum()``)."""
    entropy: Tensor | None = None
    """[B, T] entropy of pi_theta's next-token distribution (carries grad); needed only with an
    entropy bonus (``Objective.needs_entropy``)."""

    def __post_init__(self) -> None:
        if self.num_sequences is None:
            self.num_sequences = int(self.loss_mask.shape[0])
        if self.num_tokens is None:
            self.num_tokens = int(self.loss_mask.sum().item())


@dataclass
class LossOutputs:
    """The scalar to backpropagate and the objective's diagnostics (all ``[]`` tensors).

    Diagnostics are token means over this micro-batch's trainable tokens, detached.
    """

    loss: Tensor
    """[] the total loss (policy + beta * KL), aggregated; call ``.backward()`` on it."""
    policy_loss: Tensor
    """[] the clipped-surrogate part alone, aggregated the same way."""
    kl: Tensor
    """[] mean k3 estimate of KL(pi_theta || pi_ref); 0 when there is no reference."""
    clip_low_fraction: Tensor
    """[] fraction of tokens with rho < 1 - eps_low and A < 0 (clip active, no gradient)."""
    clip_high_fraction: Tensor
    """[] fraction of tokens with rho > 1 + eps_high and A > 0 (clip active, no gradient)."""
    ratio_mean: Tensor
    """[] mean of rho = pi_theta / pi_prox (exactly 1 on the first iteration)."""
    behavior_kl: Tensor
    """[] mean k3 estimate of KL(pi_prox || mu): how far learner and sampler disagree."""
    extra: dict[str, Tensor] = field(default_factory=dict)
    """[] further diagnostics by name: the sampler/learner mismatch (every objective) and the
    importance weights (decoupled, plain). Over micro-batches a name ending in ``_max`` is
    reduced by max, ``_min`` by min, any other by a token-weighted mean."""


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``pi_ref/pi - log(pi_ref/pi) - 1`` per token: an unbiased, non-negative KL(pi||pi_ref) estimate.

    With ``x = log pi_ref - log pi``, ``e^x - x - 1 >= 0`` with equality iff ``x = 0``.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
    return torch.exp(log_ratio) - log_ratio - 1.0


# --- aggregations: [B, T] per-token values -> [] scalar -------------------------------------
# Signature: (values [B, T], mask [B, T], num_sequences, num_tokens, constant) -> [].

Aggregator = Callable[[Tensor, Tensor, int, int, float], Tensor]


def aggregate_sequence_mean(
    values: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, constant: float
) -> Tensor:
    """``1/B sum_i (sum_t m_{i,t} x_{i,t} / sum_t m_{i,t})`` (GRPO); empty sequences add 0."""
    per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_sequence.sum() / max(num_sequences, 1)


def aggregate_token_mean(values: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, constant: float) -> Tensor:
    """``sum_{i,t} m x / sum_{i,t} m`` over the whole batch (DAPO)."""
    return (values * mask).sum() / max(num_tokens, 1)


def aggregate_constant(values: Tensor, mask: Tensor, num_sequences: int, num_tokens: int, constant: float) -> Tensor:
    """``sum_{i,t} m x / (B * L)`` with the constant ``L`` (Dr. GRPO)."""
    return (values * mask).sum() / (max(num_sequences, 1) * constant)


AGGREGATIONS: dict[str, Aggregator] = {
    "sequence": aggregate_sequence_mean,
    "token": aggregate_token_mean,
    "constant": aggregate_constant,
}
"""Loss aggregation by name; ``TrainConfig.aggregation`` picks one once."""


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(
    inputs: LossInputs,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    aggregate: Aggregator,
    constant: float,
    surrogate: SurrogateFn = clipped_surrogate,
    entropy_coef: float = 0.0,
) -> LossOutputs:
    """``agg(L^surrogate + beta * k3) - entropy_coef * agg(H)`` with the ratio taken against ``old_logprobs``.

    ``surrogate`` is the policy loss per token (``surrogates.py``: clip, GSPO, CISPO). The
    entropy bonus rewards a spread-out next-token distribution, against the entropy collapse
    that ends exploration (aggregated like the policy loss, so micro-batches still add up).
    """
    mask = inputs.loss_mask.to(inputs.logprobs.dtype)  # [B, T]
    n_seq, n_tok = int(inputs.num_sequences or 0), int(inputs.num_tokens or 0)
    terms = surrogate(inputs.logprobs, inputs.old_logprobs, inputs.advantages, epsilon_low, epsilon_high, mask)
    policy_loss = aggregate(terms.loss, mask, n_seq, n_tok, constant)
    loss = policy_loss
    kl = torch.zeros((), dtype=mask.dtype)
    if inputs.ref_logprobs is not None:
        per_token_kl = k3_kl(inputs.logprobs, inputs.ref_logprobs)  # [B, T]
        loss = loss + beta * aggregate(per_token_kl, mask, n_seq, n_tok, constant)
        kl = _masked_mean(per_token_kl.detach(), mask)
    if entropy_coef:
        if inputs.entropy is None:
            raise ValueError(
                "an entropy bonus needs LossInputs.entropy (build the learner with Objective.needs_entropy)"
            )
        loss = loss - entropy_coef * aggregate(inputs.entropy, mask, n_seq, n_tok, constant)
    with torch.no_grad():
        behavior_kl = _masked_mean(k3_kl(inputs.old_logprobs, inputs.behavior_logprobs), mask)
        return LossOutputs(
            loss=loss,
            policy_loss=policy_loss.detach(),
            kl=kl,
            clip_low_fraction=_masked_mean(terms.clipped_low.to(mask.dtype), mask),
            clip_high_fraction=_masked_mean(terms.clipped_high.to(mask.dtype), mask),
            ratio_mean=_masked_mean(terms.ratio.detach(), mask),
            behavior_kl=behavior_kl,
        )


LossFn = Callable[[LossInputs], LossOutputs]


@dataclass(frozen=True)
class Objective:
    """The loss a learner is built with, chosen once at setup: one function per kind of batch.

    ``on_policy`` serves batches sampled by the very weights being learned from (every batch
    of the synchronous loop; a pipeline's batches at staleness 0), ``stale`` the others; for
    ``grpo`` the two are the same function. ``Learner.step(batch, on_policy=...)`` picks.
    """

    stale: LossFn
    on_policy: LossFn
    needs_entropy: bool = False
    """The loss reads ``LossInputs.entropy`` (an entropy bonus): the learner computes it with grad."""

    @classmethod
    def of(cls, loss: LossFn | Objective) -> Objective:
        """Return ``loss`` as an objective: a single function serves both kinds of batch."""
        return loss if isinstance(loss, Objective) else cls(stale=loss, on_policy=loss)


# --- behaviour importance weights pi_prox / mu (decoupled and plain objectives) ------------


@dataclass
class ImportanceWeights:
    """The behaviour importance weights of one (micro-)batch, detached."""

    raw: Tensor
    """[B, T] pi_prox / mu before the cap (per token, or the sequence's product on each token)."""
    weight: Tensor
    """[B, T] the weight the loss applies: ``raw`` truncated at, or masked beyond, the cap."""
    capped: Tensor
    """[B, T] bool, ``raw > cap``: the cap changed this token's weight."""


def token_log_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``log pi_prox - log mu`` per token: [B, T] (0 off the mask)."""
    return (old_logprobs - behavior_logprobs) * mask


def sequence_log_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``sum_t m (log pi_prox - log mu)`` of each sequence, on each of its tokens: [B, T]."""
    per_sequence = ((old_logprobs - behavior_logprobs) * mask).sum(-1, keepdim=True)  # [B, 1]
    return per_sequence.expand_as(mask) * mask


def truncate_weights(raw: Tensor, cap: float) -> Tensor:
    """``min(w, C)``: the excess is cut off, the token still learns (truncated IS)."""
    return raw.clamp(max=cap)


def mask_weights(raw: Tensor, cap: float) -> Tensor:
    """``w if w <= C else 0``: the token is dropped from the gradient (AReaL)."""
    return torch.where(raw > cap, torch.zeros_like(raw), raw)


IMPORTANCE_LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_log_weights,
    "sequence": sequence_log_weights,
}
"""Where the importance weight is taken: per token, or per sequence (product of token ratios)."""

IMPORTANCE_CAPS: dict[str, Callable[[Tensor, float], Tensor]] = {"truncate": truncate_weights, "mask": mask_weights}
"""What happens to a weight beyond the cap."""


def importance_weights(
    old_logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    *,
    level: Callable[[Tensor, Tensor, Tensor], Tensor],
    cap_fn: Callable[[Tensor, float], Tensor],
    cap: float,
) -> ImportanceWeights:
    """Capped ``pi_prox / mu`` of every token (``level`` and ``cap_fn`` chosen at setup)."""
    with torch.no_grad():
        log_w = level(old_logprobs, behavior_logprobs, mask).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B, T]
        raw = torch.exp(log_w)
        return ImportanceWeights(raw=raw, weight=cap_fn(raw, cap) * mask, capped=(raw > cap) & (mask > 0))


def _importance_metrics(weights: ImportanceWeights, inputs: LossInputs, mask: Tensor) -> dict[str, Tensor]:
    on = mask > 0
    none = not bool(on.any())
    nan = torch.full((), float("nan"), dtype=mask.dtype)
    return {
        "is_weight_mean": _masked_mean(weights.raw, mask),
        "is_weight_max": nan if none else weights.raw[on].max(),
        "is_weight_min": nan if none else weights.raw[on].min(),
        "is_capped_fraction": _masked_mean(weights.capped.to(mask.dtype), mask),
        "behavior_abs_log_diff": _masked_mean((inputs.old_logprobs - inputs.behavior_logprobs).abs(), mask),
    }


ImportanceFn = Callable[[Tensor, Tensor, Tensor], ImportanceWeights]


def decoupled_loss(
    inputs: LossInputs, *, weigh: ImportanceFn, on_policy: bool = False, **grpo_knobs: object
) -> LossOutputs:
    """AReaL's decoupled objective: GRPO's surrogate on pi_theta/pi_prox, weighted by capped pi_prox/mu.

    The weight is non-negative and carries no gradient, so it is folded into the advantage
    (see the module docstring); the KL term is not weighted. ``on_policy``: the weight is 1.
    """
    mask = inputs.loss_mask.to(inputs.logprobs.dtype)  # [B, T]
    weights = weigh(inputs.old_logprobs, inputs.behavior_logprobs, mask)
    if not on_policy:
        inputs = dataclasses.replace(inputs, advantages=inputs.advantages * weights.weight)
    out = grpo_loss(inputs, **grpo_knobs)
    out.extra = _importance_metrics(weights, inputs, mask)
    return out


def plain_loss(
    inputs: LossInputs, *, weigh: ImportanceFn, on_policy: bool = False, **grpo_knobs: object
) -> LossOutputs:
    """GRPO's surrogate with the behaviour policy mu as the old policy (``rho = pi_theta / mu``).

    The importance weights pi_prox/mu are computed for the metrics only. ``on_policy``: the
    ratio is taken against pi_prox (which mu is).
    """
    mask = inputs.loss_mask.to(inputs.logprobs.dtype)  # [B, T]
    weights = weigh(inputs.old_logprobs, inputs.behavior_logprobs, mask)
    behaving = inputs if on_policy else dataclasses.replace(inputs, old_logprobs=inputs.behavior_logprobs)
    out = grpo_loss(behaving, **grpo_knobs)
    with torch.no_grad():  # the diagnostic stays KL(pi_prox || mu), not that of mu with itself
        out.behavior_kl = _masked_mean(k3_kl(inputs.old_logprobs, inputs.behavior_logprobs), mask)
    out.extra = _importance_metrics(weights, inputs, mask)
    return out


OBJECTIVES: dict[str, Callable[..., LossOutputs]] = {
    "grpo": grpo_loss,
    "decoupled": decoupled_loss,
    "plain": plain_loss,
}
"""Policy objectives by name (see the module docstring); ``TrainConfig.objective`` picks one."""

_WEIGHTED_OBJECTIVES = ("decoupled", "plain")
"""Objectives whose loss of a stale batch already accounts for mu (no mismatch correction on top)."""

MismatchFn = Callable[[Tensor, Tensor, Tensor], MismatchWeights]


def mismatch_corrected_loss(inputs: LossInputs, *, loss: LossFn, measure: MismatchFn, correct: bool) -> LossOutputs:
    """``loss`` with each token's advantage times the mismatch correction's weight (``correct``), plus its metrics.

    ``correct`` is fixed at setup (module docstring: the batches whose loss does not account
    for mu yet, and not 'none'); without it the inputs reach ``loss`` as they came, so the
    numbers are the uncorrected loss's bit for bit, and only the metrics are added.
    """
    mask = inputs.loss_mask.to(inputs.logprobs.dtype)  # [B, T]
    weights = measure(inputs.old_logprobs, inputs.behavior_logprobs, mask)
    if correct:
        inputs = dataclasses.replace(inputs, advantages=inputs.advantages * weights.weight)
    out = loss(inputs)
    out.extra = {**out.extra, **mismatch_metrics(weights, mask)}
    return out


def make_loss_fn(
    *,
    objective: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "token",
    constant: float = 1.0,
    is_cap: float = 5.0,
    is_level: str = "token",
    is_mode: str = "truncate",
    on_policy: bool = False,
    policy_loss: str = "clip",
    entropy_coef: float = 0.0,
    mismatch_correction: str = "none",
    mismatch_level: str = "token",
    mismatch_cap: float = 2.0,
    mismatch_floor: float = 0.5,
) -> LossFn:
    """Pick the objective and aggregation by name, once, and bind the knobs.

    ``constant`` is the fixed normaliser ``L`` of the ``"constant"`` aggregation (the
    generation budget in tokens); the other aggregations ignore it. ``is_cap``,
    ``is_level`` and ``is_mode`` shape the importance weight pi_prox/mu of the
    ``"decoupled"`` objective (``"plain"`` only logs it; ``"grpo"`` ignores them).
    ``on_policy`` builds the loss of batches sampled by the weights being learned from
    (see the module docstring): for them every objective is GRPO's. ``policy_loss`` names
    the per-token surrogate (``surrogates.SURROGATES``: clip, GSPO, CISPO), which every
    objective uses. ``entropy_coef`` weighs an entropy bonus (0: none). ``mismatch_*`` choose
    the sampler/learner correction (``mismatch.py``; already resolved: 'none', 'tis' or 'mis'),
    applied to the batches the module docstring names; its metrics are logged in any case.
    """
    for name, value, table in (
        ("objective", objective, OBJECTIVES),
        ("aggregation", aggregation, AGGREGATIONS),
        ("is_level", is_level, IMPORTANCE_LEVELS),
        ("is_mode", is_mode, IMPORTANCE_CAPS),
        ("policy_loss", policy_loss, SURROGATES),
        ("mismatch_correction", mismatch_correction, CORRECTIONS),
        ("mismatch_level", mismatch_level, IMPORTANCE_LEVELS),
    ):
        if value not in table:
            raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(table)}")
    if is_cap <= 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")
    if not 0 <= mismatch_floor < mismatch_cap:
        raise ValueError(f"need 0 <= mismatch_floor < mismatch_cap, got {mismatch_floor} and {mismatch_cap}")
    knobs: dict[str, object] = {
        "epsilon_low": epsilon_low,
        "epsilon_high": epsilon_high,
        "beta": beta,
        "aggregate": AGGREGATIONS[aggregation],
        "constant": constant,
        "surrogate": SURROGATES[policy_loss],
        "entropy_coef": entropy_coef,
    }
    if objective in _WEIGHTED_OBJECTIVES:
        knobs["weigh"] = functools.partial(
            importance_weights, level=IMPORTANCE_LEVELS[is_level], cap_fn=IMPORTANCE_CAPS[is_mode], cap=is_cap
        )
        knobs["on_policy"] = on_policy
    measure = functools.partial(
        mismatch_weights,
        level=IMPORTANCE_LEVELS[mismatch_level],
        correct=CORRECTIONS[mismatch_correction],
        cap=mismatch_cap,
        floor=mismatch_floor,
    )
    accounts_for_mu = objective in _WEIGHTED_OBJECTIVES and not on_policy
    return functools.partial(
        mismatch_corrected_loss,
        loss=functools.partial(OBJECTIVES[objective], **knobs),
        measure=measure,
        correct=mismatch_correction != "none" and not accounts_for_mu,
    )
