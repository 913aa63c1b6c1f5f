#!/usr/bin/env python
"""Train a language model with GRPO on an rlvr environment.

    python scripts/train.py --env gsm8k --max-steps 2                 # offline, CPU, default model
    python scripts/train.py --env arithmetic --max-steps 60 --output-dir runs/arith
    python scripts/train.py --config run.yaml --learning-rate 1e-6    # flags override the file
    python scripts/train.py --env gsm8k --output-dir runs/arith --resume   # continue the latest checkpoint
    python scripts/train.py --env gsm8k --max-staleness 2    # generation overlapped with learning
    python scripts/train.py --env gsm8k --generator vllm --learner deepspeed --zero-stage 2
    python scripts/train.py --env arithmetic --cluster ray --num-generators 2 --max-staleness 1   # Ray actors
    deepspeed --num_gpus 2 scripts/train.py --env gsm8k --learner deepspeed --zero-stage 3   # 2 learner ranks

Every flag is a field of ``rlvr.trainer.config.TrainConfig`` (``--help`` lists them with
their docstrings). Writes ``OUTPUT_DIR/metrics.jsonl`` (one JSON object per step),
``OUTPUT_DIR/tensorboard/`` (when tensorboard is installed; ``--wandb-project`` adds W&B) and
``OUTPUT_DIR/checkpoints/step_N/``; ``scripts/plot.py OUTPUT_DIR`` draws the curves.
The loop itself is ``rlvr.trainer.sync_loop.train``, or with
``--max-staleness N`` the two-process pipeline ``rlvr.trainer.pipeline.loop.train_async``
(``--objective decoupled|plain|grpo``, ``--is-cap``, ``--is-level``, ``--is-mode``), or with
``--cluster ray`` the same pipeline with Ray actors as generators, ``rlvr.trainer.cluster.loop.train_ray``.
Ctrl-C or SIGTERM ends the step in progress, saves it as a checkpoint (``--resume auto`` goes on
from it) and stops the run and its generator processes or actors, with exit status 130 or 143; a
second one stops at once, without saving.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlvr.trainer.bookkeeping.interrupt import StopSignal, raise_stop_signal
from rlvr.trainer.bookkeeping.metrics import log_to_stderr, read_metrics, summarize_run
from rlvr.trainer.bookkeeping.trackers import TrackerError, check_trackers
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.flags import config_from_args

if TYPE_CHECKING:
    from rlvr.trainer.run import TrainResult

UNSOLVED_REWARD = 0.02
"""A final reward below this on the default model means it cannot solve the environment (see summary_lines)."""
WARMED_UP_ON = ("arithmetic", "rlvr/Arithmetic-v0")
"""The environment the default model was warmed up on: a ~0 there is bad luck or a bug, not a missing skill."""


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    log_to_stderr()
    try:
        check_trackers(config)  # --wandb-project without wandb: say so now, not after the model loads
    except TrackerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Imported after parsing, so --help and flag errors are instant.
    if config.cluster == "ray":  # the only path that imports Ray (pip install 'rlvr[ray]')
        from rlvr.trainer.cluster.loop import train_ray as train
    elif config.max_staleness is None:
        from rlvr.trainer.sync_loop import train
    else:
        from rlvr.trainer.pipeline.loop import train_async as train
    from rlvr.envs.registry import RegistryError
    from rlvr.trainer.bookkeeping.checkpoint import CheckpointError
    from rlvr.trainer.engines.build import EngineError
    from rlvr.trainer.engines.distributed import is_main
    from rlvr.trainer.protocols import GeneratorError

    failures: tuple[type[Exception], ...] = (GeneratorError,)  # the other side of the run failed: exit 1
    if config.cluster == "ray":
        from rlvr.trainer.cluster.learner_actors import RayLearnerError

        failures += (RayLearnerError,)
    # SIGTERM (a scheduler's preemption, `kill`) cleans up as Ctrl-C does; inside the steps the
    # first of either ends the step in progress and saves it (rlvr.trainer.bookkeeping.interrupt).
    signal.signal(signal.SIGTERM, raise_stop_signal)
    start = time.perf_counter()
    try:
        result = train(config)
    except (FileNotFoundError, CheckpointError, RegistryError, EngineError) as e:
        # no (whole) checkpoint to resume, unknown --env, engines that cannot run as asked: usage errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (StopSignal); the loops saved the step they ended on
        print(stop_message(e), file=sys.stderr)
        return e.exit_status if isinstance(e, StopSignal) else 130
    if not is_main():  # other learner ranks: rank 0 reports
        return 0
    seconds = time.perf_counter() - start
    print("\n".join(summary_lines(config, result, seconds, write_plots(config.output_dir))))
    return 0


def stop_message(e: KeyboardInterrupt) -> str:
    """Say how the run stopped and, when a checkpoint holds its last step, how to go on from it."""
    name = e.args[0] if isinstance(e, StopSignal) else "SIGINT"
    if not isinstance(e, StopSignal) or e.step is None:
        return f"interrupted ({name}): stopped at once, nothing saved since the last checkpoint"
    where = f"; saved to {e.checkpoint}; continue with --resume auto" if e.checkpoint is not None else ""
    return f"interrupted ({name}) after step {e.step}{where}"


def write_plots(output_dir: str) -> Path | None:
    """Draw the run's learning curves into OUTPUT_DIR/plots (about a second); None if that failed.

    The run is over and its metrics are safe on disk, so a plotting failure is a warning, never an error.
    """
    try:
        from rlvr.trainer.bookkeeping.plots import plot_runs

        written, _ = plot_runs([output_dir])
    except Exception as e:  # noqa: BLE001 - matplotlib missing or broken: say so, keep the run's result
        print(f"warning: no plots written ({type(e).__name__}: {e}); run scripts/plot.py {output_dir}", file=sys.stderr)
        return None
    return written[0].parent if written else None


def summary_lines(config: TrainConfig, result: TrainResult, seconds: float, plots: Path | None = None) -> list[str]:
    """Return the end-of-run summary: steps, reward first vs last, time, speed, where everything is.

    On the default model, a reward that ends at ~0 gets a plain sentence: the ~1M-parameter
    model was warmed up mostly on arithmetic, so `--env gsm8k` (the default command) is a smoke
    run of the machinery that cannot show learning, and a user should not have to guess that.
    """
    s = summarize_run(read_metrics(result.metrics_path)) if Path(result.metrics_path).exists() else {"steps": 0}
    lines = [f"done: {result.steps} steps in {seconds:.1f} s"]
    if s["steps"]:
        lines.append(
            f"  reward_mean {s['reward_start']:.3f} (first {s['window']} steps) -> {s['reward_end']:.3f} "
            f"(last {s['window']}); {s['tokens_per_second']:.0f} generated tokens/s"
        )
    out = Path(config.output_dir)
    lines.append(f"  metrics      {result.metrics_path}")
    if config.samples_every and (out / "samples.jsonl").exists():
        lines.append(f"  samples      {out / 'samples.jsonl'}  (every {config.samples_every} steps)")
    if plots is not None:
        lines.append(f"  plots        {plots}  (scripts/plot.py RUN_DIR ... overlays runs)")
    if (out / "tensorboard").is_dir():
        lines.append(f"  tensorboard  tensorboard --logdir {out}")
    lines += [
        f"  config       {out / 'config.yaml'}",
        f"  checkpoints  {out / 'checkpoints'}",
        f"  final model  {result.checkpoint}  (a --model for evaluate.py or train.py)",
    ]
    if config.model is None and config.env not in WARMED_UP_ON and s["steps"] and s["reward_end"] < UNSOLVED_REWARD:
        lines.append(
            f"note: the default model is a ~1M-parameter model warmed up mostly on arithmetic; it cannot solve "
            f"{config.env}, so a reward of ~0 here is expected and says nothing about the trainer. To see "
            f"learning, run `python scripts/train.py --env arithmetic --max-steps 60`; to train on {config.env} "
            f"for real, pass a real model, e.g. `--model Qwen/Qwen2.5-0.5B-Instruct` (on a GPU)."
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
