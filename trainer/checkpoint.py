"""Checkpoints: everything needed to continue a run where it stopped.

``OUTPUT_DIR/checkpoints/step_000010/`` holds

- the model (``save_pretrained``: config + safetensors) and the tokenizer, so the folder
  is also a plain ``--model`` for evaluation or further training;
- ``learner_state.pt``: optimizer and LR-scheduler state and the policy version;
- ``trainer_state.json``: the number of completed steps;
- ``rng_state.pt``: Python, NumPy and torch RNG states;
- ``config.yaml``: the run's ``TrainConfig``, for the record.

A checkpoint is written to ``step_N.tmp`` and renamed when complete, so a crash while
saving never leaves a half-written folder that ``--resume latest`` would pick.

Resuming restores the weights, optimizer, step and RNG state; the task order and the
sampling seed of each step are functions of (seed, step), so a resumed run draws the same
tasks as an uninterrupted one would. The config of the resumed run is the one given on
the command line (pass the same flags or ``--config``); the saved one is not re-applied.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rlvr.trainer.config import TrainConfig, config_yaml
from rlvr.trainer.distributed import barrier, is_main
from rlvr.trainer.types import Learner

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    """Where a run stands."""

    step: int
    """Completed training steps."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def save_checkpoint(output_dir: str | Path, step: int, learner: Learner, tokenizer: Any, config: TrainConfig) -> Path:
    """Write the checkpoint of ``step`` completed steps; return its folder.

    Collective with several learner ranks (every rank calls it): each writes its part
    through ``learner.save`` (DeepSpeed's sharded optimizer state) into the same folder,
    and rank 0 alone writes the rest and renames the folder once all are done.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    main = is_main()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    learner.save(str(tmp))
    barrier()
    if main:
        tokenizer.save_pretrained(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        torch.save(_rng_state(), tmp / "rng_state.pt")
        (tmp / "config.yaml").write_text(config_yaml(config))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    barrier()
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Return the complete checkpoint with the most steps under ``output_dir``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """Turn ``--resume`` (a folder, or 'latest') into a checkpoint folder, or raise clearly."""
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {Path(output_dir) / CHECKPOINTS}")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return path


def load_checkpoint(path: str | Path, learner: Learner) -> TrainerState:
    """Restore weights and optimizer into ``learner`` and the global RNGs; return the state."""
    path = Path(path)
    learner.load(str(path))
    _set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    return TrainerState(step=int(state["step"]))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
