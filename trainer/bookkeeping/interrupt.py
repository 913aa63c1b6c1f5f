"""Stopping a run on Ctrl-C or SIGTERM without losing its steps.

A run's checkpoints come every ``--checkpoint-every`` steps (default: only at the end), so
a run stopped by Ctrl-C, or by a scheduler's SIGTERM before it preempts the job (SLURM,
Kubernetes, spot instances), would lose every step since the last one. Instead, while a
loop runs its steps inside ``GracefulStop``:

- the first SIGINT or SIGTERM is only noted (and logged): the step in progress finishes,
  is logged, and is saved as a checkpoint, then the run stops with ``StopSignal``, so
  ``--resume auto`` continues from exactly there;
- a second one stops at once (``StopSignal`` raised where the program is), without saving:
  the way out of a step that hangs.

An optimizer step interrupted half-way cannot be saved as any step's state, which is why the
first signal waits for the step's end rather than saving "the last completed step" at once.
Outside the steps (loading models, starting engines) a signal stops at once, as Python's
default Ctrl-C does: there is nothing to save yet.

Only one learner process at a time arms it: under a launcher (several ranks) each rank would
note its signal at a different step and the collective checkpoint would never meet, so
there a signal stops at once (use ``--checkpoint-every``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal(KeyboardInterrupt):
    """A run stopped by a signal: which one, after which step, and the checkpoint saved (if any).

    A ``KeyboardInterrupt`` so that everything which already cleans up on Ctrl-C (generator
    processes, Ray actors) does the same on SIGTERM.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended (130, 143)."""
        return 128 + self.signum


def raise_stop_signal(signum: int, frame: Any) -> None:
    """Stop at once, with the same cleanup as Ctrl-C (a signal handler, for SIGTERM outside the steps)."""
    raise StopSignal(signum)


class GracefulStop:
    """While active, the first SIGINT/SIGTERM is noted and the loop stops at its next step boundary.

    ``with GracefulStop(enabled) as stop:`` around a loop's steps, and ``stop.end_of_step(...)``
    after each whole step: it saves the checkpoints that are due, and the step a signal came in.
    Disabled, or outside the main thread (where Python cannot set a handler), it changes nothing
    and ``requested`` stays False.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if self.enabled:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise StopSignal(signum)  # the second one: stop now, save nothing
        self.signum = signum
        logger.warning(
            "%s received: stopping when the step in progress ends, after saving it as a checkpoint "
            "(%s stops at once, without saving)",
            signal.Signals(signum).name, "Ctrl-C again" if signum == signal.SIGINT else "a second signal",
        )  # fmt: skip

    @property
    def requested(self) -> bool:
        """Whether a signal came (the run stops after the step in progress)."""
        return self.signum is not None

    def end_of_step(self, step: int, max_steps: int, every: int, save: Callable[[int], Path]) -> Path | None:
        """After step ``step`` is whole: ``save(step)`` if due (every ``every`` steps, the last) or a signal came.

        Return the checkpoint saved (None if none was due); raise ``StopSignal`` after saving if
        a signal came. The signal is read once, first: one that comes during the save counts
        for the next step, so the checkpoint named in the ``StopSignal`` is always this step's.
        """
        noted = self.requested and step < max_steps  # at the last step the run ends anyway
        due = step == max_steps or (every > 0 and step % every == 0)
        saved = save(step) if due or noted else None
        if noted:
            assert self.signum is not None
            raise StopSignal(self.signum, step, saved)
        return saved
