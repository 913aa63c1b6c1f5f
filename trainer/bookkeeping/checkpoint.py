"""Checkpoints: everything needed to continue a run where it stopped.

``OUTPUT_DIR/checkpoints/step_000010/`` holds

- the model (``save_pretrained``: config + safetensors) and the tokenizer, so the folder
  is also a plain ``--model`` for evaluation or further training;
- ``learner_state.pt``: optimizer and LR-scheduler state and the policy version;
- ``trainer_state.json``: the number of completed steps;
- ``rng_state.pt``: Python, NumPy and torch RNG states;
- ``config.yaml``: the run's ``TrainConfig``, for the record;
- ``lagged_weights/version_N.safetensors`` (asynchronous runs, ``--max-staleness eta >= 1``):
  the weights of versions ``step - eta .. step - 1``, which sample the next ``eta`` batches
  (the generator runs at a fixed lag, ``pipeline/generator_process.py`` invariant 2), so a resumed run
  samples exactly what the uninterrupted one did.

- ``manifest.json``, written last: the relative path, size and sha256 of every other file
  (DeepSpeed's ``deepspeed/`` subfolder included).

A checkpoint is written to ``step_N.tmp`` and renamed when complete, so a crash while
saving never leaves a half-written ``step_N`` folder; the manifest catches what the rename
cannot (a file truncated or changed afterwards, a copy cut short, a full disk that wrote
short files). ``--resume DIR`` refuses a folder whose files do not match its manifest,
with a message naming the file and what is wrong; ``--resume auto`` (or ``latest``) takes
the newest checkpoint that matches, and logs each newer one it skipped and why. Only the
newest ``--keep-checkpoints`` are kept (the one just written always is).

Resuming restores the weights, optimizer, step and RNG state; the task order and the
sampling seed of each step are functions of (seed, step), so a resumed run draws the same
tasks as an uninterrupted one would. The config of the resumed run is the one given on
the command line (pass the same flags or ``--config``); the saved one is not re-applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlvr.trainer.config import TrainConfig, config_yaml
from rlvr.trainer.engines.distributed import barrier, is_main
from rlvr.trainer.protocols import Learner

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
LAGGED = "lagged_weights"
_LAGGED_FILE = re.compile(r"^version_(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or corrupted; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TrainerState:
    """Where a run stands."""

    step: int
    """Completed training steps."""


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{step:06d}"


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    learner: Learner,
    tokenizer: Any,
    config: TrainConfig,
    lagged: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` completed steps; return its folder.

    Collective with several learner ranks (every rank calls it): each writes its part
    through ``learner.save`` (DeepSpeed's sharded optimizer state) into the same folder,
    and rank 0 alone writes the rest and renames the folder once all are done. ``lagged``
    (asynchronous runs): older weight versions the coming batches are sampled with, by version.
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
        for version, weights in (lagged or {}).items():
            (tmp / LAGGED).mkdir(exist_ok=True)
            # Own copies: tied tensors (embedding and LM head) may arrive sharing one storage
            # (a rank actor's gathered weights through Ray), which safetensors refuses.
            tensors = {k: v.detach().clone().contiguous() for k, v in weights.items()}
            save_file(tensors, tmp / LAGGED / f"version_{version:06d}.safetensors")
        write_manifest(tmp)  # last: every rank's files are in place (barrier above)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(output_dir, config.keep_checkpoints, keep=final)
    barrier()
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json``: size and sha256 of every file under ``folder``, by relative path."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: str | Path) -> None:
    """Raise ``CheckpointError`` unless every file in ``path``'s manifest is there with its size and sha256.

    Files not in the manifest are ignored (a user's notes do not spoil a checkpoint).
    """
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so its files cannot be checked (cut short, or not rlvr's)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: not a readable manifest ({e})") from None
    for rel, want in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it)")
        size = file.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            raise CheckpointError(f"{file}: {what}: {size} bytes, the manifest says {want['size']}")
        if _sha256(file) != want["sha256"]:
            raise CheckpointError(f"{file}: corrupted: its sha256 differs from the manifest's (same size)")


def _step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Return the ``step_N`` folders under ``output_dir/checkpoints``, newest first (``.tmp`` folders excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (0 keeps every one); never ``keep``."""
    if keep_last <= 0:
        return
    for _, path in _step_dirs(output_dir)[keep_last:]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Return the newest whole checkpoint under ``output_dir`` (it matches its manifest), or None.

    Each newer one that does not match is skipped with a warning saying why.
    """
    for _, path in _step_dirs(output_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s: %s", path.name, e)
            continue
        return path
    return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """Turn ``--resume`` (a folder, or 'auto' / 'latest') into a verified checkpoint folder, or raise clearly.

    A folder given by path that fails its manifest raises ``CheckpointError``: the user
    asked for that one, so falling back silently to another would be wrong.
    """
    if resume in ("auto", "latest"):
        path = latest_checkpoint(output_dir)
        if path is None:
            found = len(_step_dirs(output_dir))
            why = f"{found} found, none whole (see the warnings above)" if found else "none found"
            raise FileNotFoundError(f"--resume {resume}: no checkpoint under {Path(output_dir) / CHECKPOINTS} ({why})")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume {resume}: refusing a damaged checkpoint: {e}") from None
    return path


def load_checkpoint(path: str | Path, learner: Learner) -> TrainerState:
    """Restore weights and optimizer into ``learner`` and the global RNGs; return the state."""
    path = Path(path)
    learner.load(str(path))
    _set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    return TrainerState(step=int(state["step"]))


def load_lagged_weights(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """Return the lagged weight versions a checkpoint carries, by version (empty for a synchronous run's)."""
    folder = Path(path) / LAGGED
    found = [(m, f) for f in sorted(folder.glob("version_*.safetensors")) if (m := _LAGGED_FILE.match(f.name))]
    return {int(m.group(1)): load_file(f) for m, f in found}


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
