#!/usr/bin/env python
"""Train a language model with GRPO on an rlvr environment.

    python scripts/train.py --env gsm8k --max-steps 2                 # offline, CPU, default model
    python scripts/train.py --env arithmetic --max-steps 60 --output-dir runs/arith
    python scripts/train.py --config run.yaml --learning-rate 1e-6    # flags override the file
    python scripts/train.py --env gsm8k --output-dir runs/arith --resume   # continue the latest checkpoint
    python scripts/train.py --env gsm8k --max-staleness 2    # generation overlapped with learning
    python scripts/train.py --env gsm8k --generator vllm --learner deepspeed --zero-stage 2
    deepspeed --num_gpus 2 scripts/train.py --env gsm8k --learner deepspeed --zero-stage 3   # 2 learner ranks

Every flag is a field of ``rlvr.trainer.config.TrainConfig`` (``--help`` lists them with
their docstrings). Writes ``OUTPUT_DIR/metrics.jsonl`` (one JSON object per step) and
``OUTPUT_DIR/checkpoints/step_N/``. The loop itself is ``rlvr.trainer.grpo.train``, or with
``--max-staleness N`` the two-process pipeline ``rlvr.trainer.async_trainer.train_async``
(``--objective decoupled|plain|grpo``, ``--is-cap``, ``--is-level``, ``--is-mode``).
Ctrl-C stops the run (and the generator process) within seconds, with exit status 130.
"""

from __future__ import annotations

import sys

from rlvr.trainer.config import config_from_args
from rlvr.trainer.metrics import log_to_stderr


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    log_to_stderr()
    # Imported after parsing, so --help and flag errors are instant.
    if config.max_staleness is None:
        from rlvr.trainer.grpo import train
    else:
        from rlvr.trainer.async_trainer import train_async as train
    from rlvr.envs.registry import RegistryError
    from rlvr.trainer.distributed import is_main
    from rlvr.trainer.engines import EngineError
    from rlvr.trainer.generator_worker import GeneratorError

    try:
        result = train(config)
    except (FileNotFoundError, RegistryError, EngineError) as e:
        # no checkpoint to resume, unknown --env, engines that cannot run as asked: usage errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GeneratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not is_main():  # other learner ranks: rank 0 reports
        return 0
    last = result.last_metrics
    reward = f", last reward_mean {last['reward_mean']:.3f}" if last else ""
    print(f"done: {result.steps} steps{reward}; metrics {result.metrics_path}; checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
