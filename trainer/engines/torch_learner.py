"""The plain-torch Learner: one process, AdamW, gradient accumulation over micro-batches.

``TorchLearner.step(batch)`` is one generation batch's worth of learning:

1. score the batch once with the current weights, without gradients: these are
   ``old_logprobs`` (pi_prox), kept fixed for the whole step; likewise ``ref_logprobs``
   from the frozen reference model when ``beta > 0``. With ``num_iterations == 1`` the
   extra pass is skipped: pi_prox is then the detached log-probabilities of the one
   gradient pass, which are the same numbers (same weights, same batch), one forward
   pass cheaper (TRL does the same). This holds for the stale batches of the
   asynchronous trainer too: pi_prox is the learner's weights before the step,
   whatever version sampled the batch (that one is ``mu``, carried separately);
2. ``num_iterations`` times: for each micro-batch, score again with gradients, compute
   the loss (the function chosen once at setup, see ``algorithm/losses.py``) and backpropagate;
   then clip the global gradient norm and take one AdamW step.

On the first iteration pi_theta = pi_prox, so the ratio is exactly 1 and the gradient is
the plain policy gradient; later iterations are PPO-style re-use of the same samples.

The model stays in eval mode while learning: dropout would make pi_theta differ from
pi_prox on identical weights, so the first ratio would not be 1 (RL fine-tuning
practice; the tiny default model and Qwen2 have no dropout anyway).

The step algorithm lives once in ``MicroBatchLearner``; ``TorchLearner`` and the
DeepSpeed learner (``engines/deepspeed_learner.py``) differ only in five small hooks (how a
micro-batch's loss is backpropagated, how the accumulated gradient is clipped and
applied, where the learning rate is read, how metric sums are combined over ranks), so
both report the same metrics with the same meaning. The loss is chosen at construction
(an ``Objective``: a loss for on-policy batches and one for stale ones), and
``step(batch, on_policy=...)`` says which kind each batch is, on every implementation of
the ``Learner`` protocol (the Ray rank group's too).

``version`` counts completed ``step`` calls; the loop hands it to the generator with the
new weights, and rollouts record which version sampled them.

Every pass (pi_theta, pi_prox, pi_ref) runs the model body once and the LM head only on
the target tokens the loss scores (``LEAN_LOGITS``, ``algorithm/logprobs.py``): the prompt
and padding are most positions of an RLVR batch and the loss never reads them. Each
step's metrics carry its peak memory (``engines/memory.py``: resident set, and the CUDA
allocator's peaks on a GPU), the largest rank's under data parallel.

The rows of a GRPO group begin with the same prompt; on padded micro-batches each distinct
prompt runs through the body once and the rows continue from its cached keys and values
(``SHARE_PREFIX``, ``algorithm/shared_prefix.py``), in every pass, with the same numbers.

With ``micro_batch_tokens`` (``--micro-batch-tokens``) the micro-batches are groups of rows
of at most that many real tokens, each run packed without padding
(``algorithm/packing.py``); the step plans them once and every pass (pi_prox, pi_ref, each
iteration) uses the same groups. A model whose attention cannot take packed rows (probed
once) gets padded micro-batches under the same budget instead, with a log line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from rlvr.trainer.algorithm.batch import TrainBatch
from rlvr.trainer.algorithm.logprobs import sequence_logprobs, sequence_logprobs_and_entropy
from rlvr.trainer.algorithm.losses import LossFn, LossInputs, LossOutputs, Objective
from rlvr.trainer.algorithm.packing import even_out, packed_attention_error, plan_micro_batches
from rlvr.trainer.algorithm.shared_prefix import SharedPrefix, shared_prefix_error
from rlvr.trainer.engines import lora
from rlvr.trainer.engines.memory import StepMemory

logger = logging.getLogger(__name__)

_STATE_FILE = "learner_state.pt"

LEAN_LOGITS = True
"""Run the LM head only on the target tokens the loss scores (``loss_mask`` 1), for the
policy, proximal and reference passes alike. Everything the objective reads (pi_theta,
pi_prox, pi_ref, mu, entropy) is multiplied by the loss mask, so the other columns are
never used: they are 0 here instead of computed. ``False`` restores the head at every real
position, recomputed in backward, as before issue 23; it stays only so that ``scripts/bench_learner.py`` and
``tests/test_lean_logits.py`` can compare the two paths side by side (not a user flag)."""

SHARE_PREFIX = True
"""Run each group's shared prompt through the model body once per micro-batch, not once per
row (``algorithm/shared_prefix.py``; lean path, padded micro-batches). The numbers are the
same to float rounding; ``False`` is kept for ``scripts/bench_learner.py`` and the tests
that compare the two (not a user flag)."""

# Diagnostics of LossOutputs averaged over micro-batches (token-weighted) and iterations.
# Keys of the token count and entropy sum while metric sums are reduced over ranks.
_TOKENS, _ENTROPY = "__tokens__", "__entropy_sum__"
# Parts of the loss, normalised by whole-batch counts: they add up over micro-batches and
# ranks (weighting them by tokens, as the diagnostics are, would depend on the micro-batching).
_SUMMED = ("loss", "policy_loss")
_LOSS_METRICS = ("policy_loss", "kl", "clip_low_fraction", "clip_high_fraction", "ratio_mean", "behavior_kl")


class MicroBatchLearner:
    """The step algorithm shared by every learner; subclasses say how gradients are made and applied.

    ``step`` (scoring pi_prox / pi_ref, micro-batch accumulation, metric reduction) lives
    here once, so the torch and DeepSpeed learners cannot drift apart in what a step
    means or in the metrics it reports. A subclass sets the attributes listed in
    ``_setup_common`` plus ``model`` (the policy module that is scored) and implements
    five hooks:

    - ``_zero_grad()``: clear gradients before an iteration's first micro-batch;
    - ``_backward(loss, last)``: backpropagate one micro-batch's loss (``last``: the
      iteration's final micro-batch, where DeepSpeed reduces gradients over ranks);
    - ``_optimizer_step() -> float``: clip and apply the accumulated gradient, advance the
      schedule, return the global gradient norm before clipping;
    - ``_learning_rate() -> float``: the learning rate the next step will use;
    - ``_all_reduce(sums) -> sums``: combine per-rank metric sums (identity in one process).
    """

    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    objective: Objective
    num_iterations: int
    micro_batch_size: int
    micro_batch_tokens: int
    temperature: float
    version: int
    device: torch.device

    def _setup_common(
        self,
        loss: LossFn | Objective,
        ref_model: torch.nn.Module | None,
        num_iterations: int,
        micro_batch_size: int,
        temperature: float,
        version: int,
        micro_batch_tokens: int = 0,
    ) -> None:
        self.ref_model = ref_model.eval().requires_grad_(False) if ref_model is not None else None
        self.objective = Objective.of(loss)
        self.num_iterations = num_iterations
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self._packs: bool | None = None  # whether the model takes packed rows; probed on first use
        self._shares: bool | None = None  # whether it takes a shared prefix's cache; likewise
        self.temperature = temperature
        self.version = version

    def step(self, batch: TrainBatch, on_policy: bool = False) -> dict[str, float]:
        """Learn from one generation batch (``num_iterations`` optimizer steps); return metrics.

        ``on_policy``: the batch was sampled by these very weights (the loss takes the
        objective's ``on_policy`` function: GRPO's numbers bit for bit, see ``losses.py``).
        """
        loss_fn = self.objective.on_policy if on_policy else self.objective.stale
        memory = StepMemory(self.device)
        memory.start()
        self.model.eval()
        batch = batch.to(self.device)
        if batch.num_tokens == 0:  # everything masked (e.g. all truncated): nothing to learn
            self.version += 1
            return {"skipped": 1.0, "train_tokens": 0.0, "learning_rate": self._learning_rate(), **self._peaks(memory)}
        groups = self._micro_batches(batch)  # planned once: every pass uses the same micro-batches
        plans = self._prefix_plans(batch, groups)  # and the same shared prefixes
        if batch.old_logprobs is None and self.num_iterations > 1:
            batch.old_logprobs = self._score(self.model, batch, groups, plans)
        if self.ref_model is not None and batch.ref_logprobs is None:
            batch.ref_logprobs = self._score(self.ref_model, batch, groups, plans)
        totals: dict[str, float] = dict.fromkeys((*_LOSS_METRICS, "loss", "grad_norm"), 0.0)
        entropy = math.nan
        for iteration in range(self.num_iterations):
            self._zero_grad()
            sums, ent = self._accumulate(batch, groups, plans, loss_fn, with_entropy=iteration == 0)
            if iteration == 0:
                entropy = ent
            grad_norm = self._optimizer_step()
            for k, v in sums.items():
                totals[k] = _reduce(k, totals.get(k), v / self.num_iterations if _is_mean(k) else v)
            totals["grad_norm"] += grad_norm / self.num_iterations
        self.version += 1
        return {
            **totals,
            "entropy": entropy,
            "learning_rate": self._learning_rate(),
            "train_tokens": float(batch.num_tokens),
            "train_sequences": float(batch.num_sequences),
            **self._peaks(memory),
        }

    def _peaks(self, memory: StepMemory) -> dict[str, float]:
        """Return the step's peak memory (``engines/memory.py``), the largest rank's under data parallel."""
        reduced = self._all_reduce({f"{k}_max": v for k, v in memory.peaks().items()})  # *_max: max over ranks
        return {k.removesuffix("_max"): v for k, v in reduced.items()}

    def _micro_batches(self, batch: TrainBatch) -> list[slice | torch.Tensor]:
        """Plan the step's micro-batches: the rows of ``batch`` in each (cut with ``batch.select``).

        ``micro_batch_size`` consecutive rows, or with ``micro_batch_tokens`` groups of rows
        by the token budget (``algorithm/packing.py``), as many on every rank: ZeRO 2/3 run
        collectives in every micro-batch's passes (a collective, like ``step``).
        """
        if self.micro_batch_tokens <= 0:
            return batch.row_slices(self.micro_batch_size)
        lengths = batch.attention_mask.sum(-1).tolist()
        groups = plan_micro_batches(lengths, self.micro_batch_tokens, padded=not self._packs_rows())
        most = self._all_reduce({"micro_batches_max": float(len(groups))})["micro_batches_max"]
        groups = even_out(groups, int(most), lengths)
        return [torch.tensor(g, device=self.device) for g in groups]

    def _packs_rows(self) -> bool:
        """Whether micro-batches run packed: the model passed the probe (on every rank); says so once if not."""
        if self._packs is None:
            self._packs, error = self._probe_on_every_rank(packed_attention_error)
            if not self._packs:
                logger.warning(
                    "--micro-batch-tokens: %s; falling back to padded micro-batches of at most %d tokens "
                    "counted as rows x longest row",
                    error or "another rank's model does not take packed rows",
                    self.micro_batch_tokens,
                )
        return self._packs

    def _probe_on_every_rank(
        self, probe: Callable[[torch.nn.Module, torch.device], str | None]
    ) -> tuple[bool, str | None]:
        """Run ``probe`` (None: the model passes, else why not) here; return whether every rank passed, and this error.

        The ranks must agree: both probes decide how micro-batches run, and ZeRO 2/3 collectives
        must line up over ranks.
        """
        error = probe(self.model, self.device)
        passed = self._all_reduce({"probe_min": float(error is None)})["probe_min"] == 1.0
        return passed, error

    def _prefix_plans(self, batch: TrainBatch, groups: list[slice | torch.Tensor]) -> list[SharedPrefix | None]:
        """Each micro-batch's shared prefixes (``algorithm/shared_prefix.py``), None where it runs padded.

        Padded micro-batches on the lean path only (the plan is made for the loss mask's
        targets). Under data parallel a micro-batch shares only where it does on every
        rank: ZeRO-3 gathers parameters in each body call, so every rank must make as many.
        """
        if not (LEAN_LOGITS and SHARE_PREFIX) or (self.micro_batch_tokens > 0 and self._packs):
            return [None] * len(groups)
        plans = []
        for rows in groups:
            mb = batch.select(rows)
            plans.append(SharedPrefix.plan(mb.input_ids, mb.attention_mask, mb.loss_mask))
        agreed = self._all_reduce({f"prefix{i}_min": float(p is not None) for i, p in enumerate(plans)})
        if not any(agreed.values()) or not self._shares_prefix():
            return [None] * len(groups)
        return [p if agreed[f"prefix{i}_min"] == 1.0 else None for i, p in enumerate(plans)]

    def _shares_prefix(self) -> bool:
        """Whether the model passed the shared-prefix probe (on every rank); says so once if not."""
        if self._shares is None:
            self._shares, error = self._probe_on_every_rank(shared_prefix_error)
            if not self._shares:
                logger.warning(
                    "the rows of a group will each run their shared prompt through the model: %s",
                    error or "another rank's model does not take a shared prefix",
                )
        return self._shares

    @torch.no_grad()
    def _score(
        self,
        model: torch.nn.Module,
        batch: TrainBatch,
        groups: list[slice | torch.Tensor],
        plans: list[SharedPrefix | None],
    ) -> torch.Tensor:
        """Log-probabilities of every target token under ``model``: [B, T-1], no grad."""
        out = torch.zeros_like(batch.loss_mask)  # [B, T-1]
        for rows, plan in zip(groups, plans):
            mb = batch.select(rows)
            lp = sequence_logprobs(
                model, mb.input_ids, mb.attention_mask, **self._head_args(mb, plan)
            )  # [b, t-1]: the micro-batch's rows, trimmed to its longest
            out[rows, : lp.shape[1]] = lp
        return out

    def _head_args(self, mb: TrainBatch, plan: SharedPrefix | None) -> dict[str, Any]:
        """Keyword arguments of the log-prob functions: temperature, where the LM head runs, how the body runs."""
        packed = self.micro_batch_tokens > 0 and bool(self._packs)
        return {**_head_args(mb), "temperature": self.temperature, "packed": packed, "prefix": plan}

    def _accumulate(
        self,
        batch: TrainBatch,
        groups: list[slice | torch.Tensor],
        plans: list[SharedPrefix | None],
        loss_fn: LossFn,
        with_entropy: bool,
    ) -> tuple[dict[str, float], float]:
        """Forward and backward every micro-batch; return token-weighted mean diagnostics.

        Sums are reduced over ranks (``_all_reduce``) before dividing by the token count,
        so every rank reports the whole batch's means; the loss and policy loss are plain
        sums, since each micro-batch's loss is already normalised by whole-batch counts.
        """
        sums = dict.fromkeys((*_LOSS_METRICS, "loss"), 0.0)
        entropy_sum, tokens = 0.0, 0.0
        micro_batches = [batch.select(rows) for rows in groups]  # after pi_prox / pi_ref are filled in
        bonus = self.objective.needs_entropy  # the loss reads the entropy, with its gradient
        for i, (mb, plan) in enumerate(zip(micro_batches, plans)):
            entropy = None
            if with_entropy or bonus:
                scored = sequence_logprobs_and_entropy(
                    self.model, mb.input_ids, mb.attention_mask, **self._head_args(mb, plan)
                )
                logprobs, entropy = scored.logprobs, scored.entropy  # [b, t-1] each
                if with_entropy:
                    entropy_sum += float((entropy.detach() * mb.loss_mask).sum())
            else:
                logprobs = sequence_logprobs(self.model, mb.input_ids, mb.attention_mask, **self._head_args(mb, plan))
            out: LossOutputs = loss_fn(_loss_inputs(mb, logprobs, entropy if bonus else None))
            self._backward(out.loss, last=i == len(micro_batches) - 1)
            n = float(mb.loss_mask.sum().item())
            tokens += n
            sums["loss"] += float(out.loss.detach())  # already normalised by whole-batch counts
            for k in _LOSS_METRICS:
                sums[k] += float(getattr(out, k)) * (1.0 if k in _SUMMED else n)
            for k, v in out.extra.items():  # objective-specific diagnostics
                sums[k] = _reduce(k, sums.get(k), float(v) * n if _is_mean(k) else float(v))
        reduced = self._all_reduce({**sums, _TOKENS: tokens, _ENTROPY: entropy_sum})
        tokens, entropy_sum = reduced.pop(_TOKENS), reduced.pop(_ENTROPY)
        sums = {k: reduced[k] for k in sums}  # keep the metrics' order
        for k in sums:
            if k not in _SUMMED and _is_mean(k):
                sums[k] /= max(tokens, 1.0)
        return sums, entropy_sum / max(tokens, 1.0) if with_entropy else math.nan

    # --- hooks -----------------------------------------------------------------------------

    def _zero_grad(self) -> None:
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self) -> float:
        raise NotImplementedError

    def _learning_rate(self) -> float:
        raise NotImplementedError

    def _all_reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return sums


class TorchLearner(MicroBatchLearner):
    """Implements the ``Learner`` protocol with a single torch model and AdamW."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn | Objective,
        *,
        learning_rate: float,
        ref_model: torch.nn.Module | None = None,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        num_iterations: int = 1,
        micro_batch_size: int = 16,
        temperature: float = 1.0,
        version: int = 0,
        micro_batch_tokens: int = 0,
    ):
        self._setup_common(loss, ref_model, num_iterations, micro_batch_size, temperature, version, micro_batch_tokens)
        self.model = model
        self.max_grad_norm = max_grad_norm
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(warmup_steps))

    # --- the Learner protocol ----------------------------------------------------------

    def weights_for_generation(self) -> dict[str, torch.Tensor]:
        """Return the current weights by name (detached views; copy before mutating); LoRA: the adapters only."""
        return lora.generation_weights(self.model)

    def save(self, path: str) -> None:
        """Write the model (``save_pretrained``; LoRA: peft's adapter files) and optimizer/scheduler/version state."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if lora.is_lora(self.model):
            lora.save_adapters(self.model, out)
        else:
            self.model.save_pretrained(out)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "version": self.version,
        }
        torch.save(state, out / _STATE_FILE)

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote: weights into the existing model, then optimizer state."""
        src = Path(path)
        if lora.is_lora(self.model):
            lora.load_adapters(self.model, src)
        else:
            saved = AutoModelForCausalLM.from_pretrained(src, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(saved.state_dict())
            del saved
        state = torch.load(src / _STATE_FILE, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])

    # --- hooks of MicroBatchLearner --------------------------------------------------------

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _optimizer_step(self) -> float:
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _clip_gradients(self) -> float:
        """Clip the global gradient norm to ``max_grad_norm`` (0: no clipping); return the norm."""
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(grads, limit))


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier of optimizer step s: linear warmup over ``warmup_steps`` steps, then constant."""

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def _is_mean(name: str) -> bool:
    """Whether a diagnostic is averaged (the others, ``*_max`` / ``*_min``, are extremes)."""
    return not name.endswith(("_max", "_min"))


def _reduce(name: str, acc: float | None, value: float) -> float:
    """Fold ``value`` into ``acc``: sum for averaged diagnostics, max / min for extremes."""
    if acc is None:
        return value
    if name.endswith("_max"):
        return max(acc, value)
    if name.endswith("_min"):
        return min(acc, value)
    return acc + value


def _head_args(mb: TrainBatch) -> dict[str, Any]:
    """Where the LM head runs: on the loss mask's targets; everywhere, always recomputed, with ``LEAN_LOGITS`` off."""
    return {"positions": mb.loss_mask} if LEAN_LOGITS else {"positions": None, "recompute_head": True}


def _loss_inputs(mb: TrainBatch, logprobs: torch.Tensor, entropy: torch.Tensor | None = None) -> LossInputs:
    return LossInputs(
        logprobs=logprobs,
        # None only with num_iterations == 1: pi_prox is the current policy itself.
        old_logprobs=mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach(),
        behavior_logprobs=mb.behavior_logprobs,
        advantages=mb.advantages,
        loss_mask=mb.loss_mask,
        ref_logprobs=mb.ref_logprobs,
        num_sequences=mb.num_sequences,
        num_tokens=mb.num_tokens,
        entropy=entropy,
    )
