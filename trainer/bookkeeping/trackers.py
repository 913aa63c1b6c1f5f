"""Where a run's per-step record goes: metrics.jsonl always, TensorBoard and W&B when installed.

A tracker is anything with ``log(step, record)``, ``log_samples(step, samples)`` and
``close()`` (the ``Tracker`` protocol). ``RunLog`` (bookkeeping/metrics.py) hands every tracker the same
record that metrics.jsonl gets and, every ``--samples-every`` steps, the same samples that
samples.jsonl gets, so the dashboards never disagree with the file tests and plots read.

- ``JsonlTracker`` (bookkeeping/metrics.py, beside the writer it wraps): ``OUTPUT_DIR/metrics.jsonl`` and
  ``samples.jsonl``, the durable record (fsync'ed each step); always on.
- ``TensorBoardTracker``: event files in ``OUTPUT_DIR/tensorboard/`` whenever the
  ``tensorboard`` package is importable (a default dependency): every numeric value as a
  scalar by step, samples as markdown text. ``tensorboard --logdir OUTPUT_DIR`` shows them.
- ``WandbTracker``: with ``--wandb-project NAME`` (needs ``pip install 'rlvr[wandb]'``): the
  same scalars, samples as a table, the config as the run's config. ``WANDB_MODE=offline``
  works without an account. W&B sends a step's row when the next step begins (the last at
  close), so the step's samples, logged after its metrics, land in the same row.

Non-numeric values (strings, None for NaN, booleans) are JSONL-only: dashboards plot numbers.

Resume: JSONL keeps the records up to the checkpoint's step and drops later ones (the steps
that will run again). TensorBoard does the same with ``purge_step = resume_step + 1``: the
event reader hides everything an earlier attempt wrote from that step on; a fresh run purges
from step 1, so a rerun into the same OUTPUT_DIR does not overlay the old curves. W&B
continues the same run (its id is kept in ``OUTPUT_DIR/wandb_run_id``); W&B refuses steps
at or below the last one it saw, so the re-run steps between the checkpoint and a crash keep
their first values there (JSONL and TensorBoard have the re-run values).

Only rank 0 logs: ``open_trackers`` returns no dashboard trackers on other ranks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rlvr.trainer.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
"""Sub-folder of OUTPUT_DIR for the TensorBoard event files."""
WANDB_ID_FILE = "wandb_run_id"
"""File in OUTPUT_DIR holding the W&B run id, so a resumed run continues the same W&B run."""
WANDB_INSTALL = "pip install 'rlvr[wandb]'  (or: pip install wandb)"


class TrackerError(RuntimeError):
    """A tracker was asked for but cannot run; the message says what to install."""


class Tracker(Protocol):
    """One destination for a run's per-step metrics and samples."""

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """Record one step's metrics (the metrics.jsonl object, ``step`` included)."""

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Record the step's sample episodes (the samples.jsonl objects)."""

    def close(self) -> None:
        """Flush and release files and connections."""


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the values of ``record`` a dashboard can plot: finite ints and floats, ``step`` left out.

    Booleans are ints in Python but flags, not curves; None is how metrics.jsonl writes NaN.
    """
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """Render samples.jsonl objects as markdown for TensorBoard's text tab (code blocks keep the text as is)."""
    parts = []
    for s in samples:
        completions = "\n\n".join(f"```\n{c}\n```" for c in s.get("completions", []))
        parts.append(
            f"### group {s.get('group')}, task {s.get('task_id')}: reward {s.get('reward')}\n\n"
            f"components: `{s.get('reward_components')}`; parsed: `{s.get('parsed')}`; "
            f"reason: {s.get('reason')}\n\n**prompt**\n\n```\n{s.get('prompt')}\n```\n\n**completion**\n\n{completions}"
        )
    return "\n\n---\n\n".join(parts)


class TensorBoardTracker:
    """Event files in ``OUTPUT_DIR/tensorboard/``: scalars by step, samples as text (tag ``samples``)."""

    def __init__(self, output_dir: str | Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # Hide what an earlier attempt wrote from this run's first step on (see the module docstring).
        purge = (resume_step or 0) + 1
        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        # Flushed every step (the default is every 120 s) so a live dashboard is current.
        self.writer.flush()

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if samples:
            self.writer.add_text("samples", samples_markdown(samples), global_step=step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


SAMPLE_COLUMNS = ("step", "group", "task_id", "prompt", "completions", "reward", "parsed", "reason")


class WandbTracker:
    """A W&B run named after OUTPUT_DIR, with the config; scalars by step, samples as a table."""

    def __init__(self, project: str, output_dir: str | Path, resume_step: int | None, config: Any = None):
        import wandb

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / WANDB_ID_FILE
        # A resumed run continues its W&B run; a fresh one starts a new run (and records its id).
        if resume_step is not None and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        hparams = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        self.run = wandb.init(
            project=project, name=out.resolve().name, id=run_id, resume="allow", dir=str(out), config=hparams
        )
        self._wandb = wandb

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        if samples:
            rows = [[str(s.get(c)) if c in ("parsed", "completions") else s.get(c) for c in SAMPLE_COLUMNS]
                    for s in samples]  # fmt: skip
            self.run.log({"samples": self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


def check_trackers(config: TrainConfig) -> None:
    """Raise ``TrackerError`` when ``config`` asks for a tracker whose package is missing.

    Called by train.py before the model loads, so a missing ``wandb`` fails in a second, not
    after setup.
    """
    if config.wandb_project and importlib.util.find_spec("wandb") is None:
        raise TrackerError(f"--wandb-project needs the wandb package, which is not installed: {WANDB_INSTALL}")


def tensorboard_available() -> bool:
    """Whether TensorBoard event files can be written (``torch.utils.tensorboard`` needs ``tensorboard``)."""
    return importlib.util.find_spec("tensorboard") is not None


def open_trackers(output_dir: str | Path, resume_step: int | None, config: TrainConfig | None = None) -> list[Tracker]:
    """Return the dashboard trackers for this run: TensorBoard if installed, W&B if ``config`` names a project.

    Empty on ranks other than 0 (rank 0 alone logs).
    """
    from rlvr.trainer.engines.distributed import is_main  # imported here: distributed -> batch -> rollout -> metrics

    if not is_main():
        return []
    trackers: list[Tracker] = []
    if tensorboard_available():
        trackers.append(TensorBoardTracker(output_dir, resume_step))
    if config is not None and config.wandb_project:
        check_trackers(config)
        trackers.append(WandbTracker(config.wandb_project, output_dir, resume_step, config))
    return trackers


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker, even when one fails; then raise the first failure."""
    error: BaseException | None = None
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as e:  # noqa: BLE001 - the others must still close
            error = error or e
    if error is not None:
        raise error
