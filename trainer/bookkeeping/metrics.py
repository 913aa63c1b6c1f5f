"""Per-step metrics: what a rollout batch says, timing, and the metrics.jsonl writer.

One JSON object per step is appended to ``OUTPUT_DIR/metrics.jsonl`` and flushed (and
fsync'ed) before the next step starts, so a crash loses at most the step in flight and
tests can read learning curves from the file instead of parsing console text.

Keys written every step (learner keys come from ``TorchLearner.step``):

- ``step``; ``reward_mean``, ``reward_std`` over episodes; ``components/<name>_mean`` and
  ``_std`` for each reward component the environment reports;
- ``zero_spread_fraction``: groups whose rewards are all equal (they teach nothing);
- ``completion_length_mean`` / ``_max`` (model tokens per episode, all turns),
  ``truncated_fraction`` (episodes with a turn cut at max_new_tokens), ``turns_mean``;
- ``time/generation``, ``time/reward`` (inside the environments, where verifiers run),
  ``time/learning``, ``time/step``; ``tokens_per_second`` (generated tokens per second of
  the whole step) and ``generation_tokens_per_second``.

With ``--objective decoupled`` or ``plain`` (algorithm/losses.py): ``is_weight_mean`` / ``_max`` /
``_min`` of pi_prox/mu, ``is_capped_fraction`` (tokens whose weight the cap truncated or
masked) and ``behavior_abs_log_diff`` (mean |log pi_prox - log mu|, next to the k3
``behavior_kl``). The asynchronous pipeline (pipeline/loop.py) adds ``staleness_mean``,
``staleness_max``, ``staleness_hist_0 .. _eta`` (fraction of model turns k steps stale),
``policy_version`` (the weights that sampled the batch), ``time/wait_rollouts`` (learner
waiting for the batch), ``time/weight_publish`` / ``time/weight_receive`` (weight sync on
each side; the synchronous loop logs ``time/weight_sync``, the learner's weights handed to
the generator), ``time/generator_wait`` / ``_busy``, ``async/learner_idle_fraction`` and
``async/generator_idle_fraction`` (waiting time over wall time, per step),
``async/buffered_batches`` and ``async/generator_restarts``.

With ``--dynamic-sampling`` (algorithm/dynamic_sampling.py) the reward, spread and length keys
above describe the **learned** batch, what the learner saw (its ``zero_spread_fraction`` is
0 unless no group was informative), so they agree with the loss and advantage keys beside
them; what the policy scores on the task stream is ``dynamic/reward_mean_sampled``, the mean
return of every episode the step played (all rounds, dropped groups included: the learned
batch leaves out all-right and all-wrong groups, so its mean says little of the policy).
Beside it ``dynamic/groups_sampled`` (groups played, every round, every shard),
``dynamic/groups_zero_spread``, ``dynamic/groups_learned``, ``dynamic/groups_dropped``
(played, not learned: zero-spread or surplus), ``dynamic/rounds`` (extra rounds; over Ray's
shards the most any played), ``dynamic/groups_short`` (informative groups the step lacked
after the bound) and ``dynamic/no_informative`` (1: not one group had spread, the step
learned from zero-spread groups, a zero policy gradient). The step's costs count every
round: ``time/generation``, ``time/reward``, and ``generated_tokens`` (so the throughputs
are of every token sampled, not only of the learned ones).

Every ``--samples-every`` steps, ``samples.jsonl`` (same writer, same resume rule) gets
one episode of each of the first ``SAMPLES_PER_LOG`` groups: the prompt as the model saw
it, the completions, reward and components, what the verifier parsed and why it scored
so, so a user can read what the model is doing without a debugger.

``RunLog`` hands each step's record and samples to every tracker (bookkeeping/trackers.py): these two
files, and TensorBoard / W&B when they are installed and asked for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlvr.trainer.algorithm.advantages import zero_spread_fraction
from rlvr.trainer.bookkeeping.trackers import Tracker, close_all, open_trackers

if TYPE_CHECKING:
    from rlvr.trainer.algorithm.rollout import Played, RolloutBatch
    from rlvr.trainer.config import TrainConfig

SAMPLES_PER_LOG = 4
"""Episodes written to samples.jsonl per logged step: the first of each of this many groups (distinct prompts)."""


def log_to_stderr() -> None:
    """Show rlvr's own INFO lines (which engines a run took, restarts) on stderr as ``[rlvr] ...``.

    Only the ``rlvr`` logger: the libraries' own INFO chatter (DeepSpeed, vLLM) keeps its own settings.
    """
    log = logging.getLogger("rlvr")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[rlvr] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values)


def rollout_metrics(rollouts: RolloutBatch) -> dict[str, float]:
    """Reward, spread, length and truncation statistics of one step's episodes."""
    episodes = rollouts.episodes
    rewards = [e.reward for e in episodes]
    out: dict[str, float] = {}
    out["reward_mean"], out["reward_std"] = _mean_std(rewards)
    names = sorted({k for e in episodes for k in e.reward_components})
    for name in names:
        values = [e.reward_components[name] for e in episodes if name in e.reward_components]
        out[f"components/{name}_mean"], out[f"components/{name}_std"] = _mean_std(values)
    returns = torch.tensor([[e.reward for e in group] for group in rollouts.groups], dtype=torch.float64)
    out["zero_spread_fraction"] = zero_spread_fraction(returns)
    lengths = [e.num_model_tokens for e in episodes]
    out["completion_length_mean"] = statistics.fmean(lengths)
    out["completion_length_max"] = float(max(lengths))
    out["truncated_fraction"] = statistics.fmean(float(e.length_truncated) for e in episodes)
    out["context_truncated_fraction"] = statistics.fmean(float(e.context_truncated) for e in episodes)
    out["turns_mean"] = statistics.fmean(e.num_turns for e in episodes)
    out["generated_tokens"] = float(sum(lengths))
    return out


def dynamic_metrics(played: Played, learned: int, informative: int) -> dict[str, float]:
    """Return the ``dynamic/*`` keys of a step that played ``played`` and learns ``learned`` groups.

    ``informative``: how many of the learned groups have spread (0: none had, all are learned).
    """
    return {
        "dynamic/groups_sampled": float(played.groups),
        "dynamic/groups_zero_spread": float(played.zero_spread),
        "dynamic/groups_learned": float(learned),
        "dynamic/groups_dropped": float(played.groups - learned),
        "dynamic/rounds": float(played.rounds),
        "dynamic/groups_short": float(max(0, played.quota - informative)),
        "dynamic/no_informative": float(informative == 0),
        "dynamic/reward_mean_sampled": played.reward_sum / max(played.episodes, 1),
    }


def timing_metrics(
    generated_tokens: float, generation_s: float, reward_s: float, learning_s: float, step_s: float
) -> dict[str, float]:
    """Where the step's time went, and throughput in generated tokens per second."""
    return {
        "time/generation": generation_s,
        "time/reward": reward_s,
        "time/learning": learning_s,
        "time/step": step_s,
        "tokens_per_second": generated_tokens / max(step_s, 1e-9),
        "generation_tokens_per_second": generated_tokens / max(generation_s, 1e-9),
    }


class MetricsWriter:
    """Writes one JSON object per step to a JSONL file, durably.

    A fresh run (``resume_step`` None) starts the file over; a resumed run keeps the
    records up to its checkpoint's step and drops any written after it (steps that ran
    past the last checkpoint before a crash, and will now run again).
    """

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
        self._file = self.path.open("w", encoding="utf-8")
        for record in kept:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write(self, record: dict[str, float | int | str]) -> None:
        # NaN is not JSON; write null so every line parses with any JSON reader.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean, sort_keys=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


RISE_FIRST_STEPS = 10


def reward_rise(rewards: Sequence[float], first: int = RISE_FIRST_STEPS) -> tuple[float, float]:
    """Return how far a run's reward rose: the mean of its first ``first`` steps and of its second half.

    The definition the learning tests (``end - start >= 0.3``) and ``scripts/bench_recipes.py``
    share. The start is short because the reward climbs fastest in the first steps. The end
    is the second half of the run: one step's mean over 128 episodes moves by 0.05-0.1 from
    step to step, and late dips of 10-30 steps come and go. Over 17 distinct runs of 200
    steps on ``arithmetic`` (recipes, seeds, engines), the smallest rise read +0.227 against
    the last 10 steps, +0.261 against the last 30 and +0.315 against the second half.
    """
    if len(rewards) < 2 * first:
        raise ValueError(f"{len(rewards)} rewards: a rise needs at least {2 * first} steps")
    return statistics.fmean(rewards[:first]), statistics.fmean(rewards[len(rewards) // 2 :])


def summarize_run(records: list[dict], window: int = 5) -> dict[str, float]:
    """Return what a finished run's metrics add up to, for the end-of-run summary.

    ``reward_start`` / ``reward_end`` are the mean ``reward_mean`` of the first and last
    ``window`` steps (fewer when the run is shorter): one step's reward is too noisy to
    compare. ``tokens_per_second`` is every generated token over every step's wall time,
    so a resumed run counts the steps run before the resume too.
    """
    if not records:
        return {"steps": 0}
    rewards = [r["reward_mean"] for r in records if isinstance(r.get("reward_mean"), (int, float))]
    seconds = sum(float(r.get("time/step") or 0.0) for r in records)
    tokens = sum(float(r.get("generated_tokens") or 0.0) for r in records)
    n = max(1, min(window, len(rewards)))
    return {
        "steps": int(records[-1].get("step", len(records))),
        "window": n,
        "reward_start": statistics.fmean(rewards[:n]) if rewards else math.nan,
        "reward_end": statistics.fmean(rewards[-n:]) if rewards else math.nan,
        "step_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
    }


def sample_records(step: int, rollouts: RolloutBatch, tokenizer: Any, n: int = SAMPLES_PER_LOG) -> list[dict]:
    """Return samples.jsonl lines for ``step``: the first episode of each of the first ``n`` groups."""
    records = []
    for group in rollouts.groups[:n]:
        e = group[0]
        try:
            parsed = json.loads(json.dumps(e.parsed))
        except (TypeError, ValueError):
            parsed = str(e.parsed)  # a verifier may parse into any object
        records.append({
            "step": step, "group": e.group, "task_id": e.task_id,
            "prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=False),
            "completions": e.completions, "reward": e.reward, "reward_components": e.reward_components,
            "parsed": parsed, "reason": e.reason, "length": e.num_model_tokens, "truncated": e.length_truncated,
        })  # fmt: skip
    return records


class JsonlTracker:
    """metrics.jsonl and samples.jsonl (none when ``samples`` is False), resumed together: the durable record."""

    def __init__(self, output_dir: str | Path, resume_step: int | None, samples: bool):
        self.metrics = MetricsWriter(Path(output_dir) / "metrics.jsonl", resume_step=resume_step)
        self.samples = MetricsWriter(Path(output_dir) / "samples.jsonl", resume_step) if samples else None

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.metrics.write(dict(record))

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if self.samples is not None:
            for sample in samples:
                self.samples.write(sample)

    def close(self) -> None:
        self.metrics.close()
        if self.samples is not None:
            self.samples.close()


class RunLog:
    """A run's metrics and samples, sent to every tracker (``trackers.py``), resumed together; one ``write`` per step.

    metrics.jsonl and samples.jsonl always; TensorBoard event files in ``OUTPUT_DIR/tensorboard``
    when tensorboard is installed; W&B when ``config.wandb_project`` is set (``config`` also
    becomes the W&B run's config). Without ``config`` there is no W&B.
    """

    def __init__(
        self,
        output_dir: str | Path,
        resume_step: int | None,
        samples_every: int,
        tokenizer: Any,
        *,
        config: TrainConfig | None = None,
    ):
        self.jsonl = JsonlTracker(output_dir, resume_step, samples=bool(samples_every))
        self.trackers: list[Tracker] = [self.jsonl]
        try:
            self.trackers += open_trackers(output_dir, resume_step, config)
        except BaseException:
            self.jsonl.close()
            raise
        self.samples_every, self.tokenizer = samples_every, tokenizer

    def write(self, record: dict[str, Any], rollouts: RolloutBatch) -> None:
        """Log the step's metrics everywhere, and on every ``samples_every``-th step its samples."""
        step = int(record["step"])
        for tracker in self.trackers:
            tracker.log(step, record)
        if self.samples_every and step % self.samples_every == 0:
            samples = sample_records(step, rollouts, self.tokenizer)
            for tracker in self.trackers:
                tracker.log_samples(step, samples)

    def close(self) -> None:
        close_all(self.trackers)
