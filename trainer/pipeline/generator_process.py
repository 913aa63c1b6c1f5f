"""The generator process: it samples the batches of the coming steps while the learner learns.

Child side, :func:`run_generator`: its own generator (``--generator``: transformers, or
vLLM in-process), on its own copy of the model (architecture loaded as ``--model`` names
it, weights from the transport), its own environments and so its own
reward computation (the verifier pools and the code sandbox work from any process), and
the same task schedule and per-step sampling seeds as the synchronous loop. Parent side,
:class:`GeneratorProcess`: starts it (``spawn``), receives its batches, stops it.

Invariants:

1. **Each step once, in order.** A generator started after step ``start`` produces the
   batches of steps ``start + 1 .. max_steps`` in order, each exactly once, each sampled
   wholly with one weight version (weights change only between batches).
2. **Admission, at a fixed lag.** Before the batch of step ``s`` it holds weights of
   version ``>= Admission.min_version(s) = s - 1 - eta`` and waits for them otherwise
   (``algorithm/staleness.py``, invariant 1); it moves to the *oldest* admissible version the
   transport holds, which is exactly ``s - 1 - eta`` whenever that was published. So which
   weights sample which step is a function of the step alone, not of timing: a run is
   reproducible, and a resumed run (whose checkpoint carries the lagging versions) samples
   what the uninterrupted one did. Taking the newest instead would lower staleness only
   when the generator is the slower side and eta >= 2 (at eta = 1 the newest admissible
   version *is* ``s - 2``: the learner cannot pass version ``s - 1`` before batch ``s``).
3. **Bounded waits.** Every wait, on either side, polls with a timeout of a fraction of a
   second and checks the other side: the child checks the stop event and that its parent
   is alive (and asks the kernel for SIGTERM when the parent dies: ``PR_SET_PDEATHSIG``);
   the parent checks that the child is alive and reports its exit code otherwise.
4. **Errors travel.** An exception in the child is sent to the parent as a
   :class:`GeneratorFailure` (type, message, traceback) before the child exits with code 1;
   the parent raises it as :class:`GeneratorError`. A child that dies without a word
   (killed, out of memory) is reported with its exit code or signal.
5. **No half messages.** Batches travel over a one-way pipe whose write end only the child
   holds, read by a parent thread into a local queue: a child killed in the middle of a
   message gives the reader EOF, never a hang, and the child never blocks on a full pipe.
6. **Shutdown.** The child ignores SIGINT (Ctrl-C reaches the whole process group; the
   parent owns shutdown) and exits on SIGTERM; :meth:`GeneratorProcess.stop` sets the stop
   event, then escalates to SIGTERM and SIGKILL, and always joins: no process is left behind.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from rlvr.trainer.algorithm.rollout import RolloutBatch
from rlvr.trainer.algorithm.staleness import Admission
from rlvr.trainer.config import TrainConfig
from rlvr.trainer.engines.build import resolve_device, setup_process
from rlvr.trainer.protocols import GeneratorError
from rlvr.trainer.step import Player
from rlvr.trainer.weights.shared_memory import WeightTransport

_POLL = 0.1  # seconds between liveness checks while waiting
_PR_SET_PDEATHSIG = 1


@dataclass
class GeneratorSpec:
    """Everything the child needs, picklable."""

    config: TrainConfig
    start_step: int
    """Steps already done (or already received): the child produces ``start_step + 1`` onward."""
    threads: int
    """torch intra-op threads of the child (0: torch's default)."""
    parent_pid: int


@dataclass
class RolloutMessage:
    """One finished batch, from the child."""

    step: int
    version: int
    """The weight version that sampled every episode of the batch."""
    rollouts: RolloutBatch
    wait_seconds: float
    """Time spent waiting for admissible weights before this batch (generator idle)."""
    receive_seconds: float
    """Time spent copying new weights into the generator's model."""
    busy_seconds: float
    """Time spent playing the batch (sampling and environments)."""


@dataclass
class GeneratorFailure:
    """An exception raised in the child."""

    step: int
    error: str
    """``Type: message``."""
    traceback: str


# --- child side ------------------------------------------------------------------------------


def run_generator(spec: GeneratorSpec, transport: WeightTransport, outbox: Any, stop: Any) -> None:
    """Child entry point: produce batches until ``max_steps`` or until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent(spec.parent_pid)
    step = spec.start_step
    try:
        worker = _Worker(spec, transport)
        for step in range(spec.start_step + 1, spec.config.max_steps + 1):
            message = worker.produce(step, lambda: _should_stop(stop, spec.parent_pid))
            if message is None:
                return
            outbox.send(message)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        outbox.send(GeneratorFailure(step=step, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
        sys.exit(1)
    finally:
        outbox.close()


class _Worker:
    """The child's state: the step core's ``Player`` (model, environments, task schedule) and the admission rule."""

    def __init__(self, spec: GeneratorSpec, transport: WeightTransport):
        config = spec.config
        setup_process(config, spec.threads)
        self.transport = transport
        self.admission = Admission(config.eta)
        # The generator config.generator names (vLLM in-process here), on its own copy of the weights.
        self.player = Player.build(config, resolve_device(config.device), threads=spec.threads)

    def produce(self, step: int, should_stop: Any) -> RolloutMessage | None:
        """Wait for admissible weights, move to the oldest admissible, play step ``step``; None if told to stop."""
        t0 = time.perf_counter()
        need = self.admission.min_version(step)
        while not self.transport.wait_for_version(need, timeout=_POLL):
            if should_stop():
                return None
        t1 = time.perf_counter()
        generator = self.player.generator
        if generator.version < need:  # invariant 2: the fixed lag, version `need` itself when published
            self.transport.receive(generator, oldest=need)
        t2 = time.perf_counter()
        rollouts = self.player.play(step)
        return RolloutMessage(
            step=step,
            version=generator.version,
            rollouts=rollouts,
            wait_seconds=t1 - t0,
            receive_seconds=t2 - t1,
            busy_seconds=time.perf_counter() - t2,
        )


def _should_stop(stop: Any, parent_pid: int) -> bool:
    return stop.is_set() or os.getppid() != parent_pid


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies (elsewhere the polls notice)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


# --- parent side -----------------------------------------------------------------------------


class GeneratorProcess:
    """Starts, watches, reads from and stops one generator child process."""

    def __init__(self, ctx: Any, spec: GeneratorSpec, transport: WeightTransport):
        self.spec = spec
        self._stop = ctx.Event()
        reader, writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_generator, args=(spec, transport, writer, self._stop), name="rlvr-generator", daemon=True
        )
        self.process.start()
        writer.close()  # only the child holds the write end: its death is EOF here (invariant 5)
        self._reader = reader
        self._inbox: queue.Queue[RolloutMessage | GeneratorFailure | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="rlvr-generator-reader", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def _read(self) -> None:
        try:
            while True:
                if self._reader.poll(_POLL):
                    self._inbox.put(self._reader.recv())
        except (EOFError, OSError):
            self._inbox.put(None)  # the child closed its end: exited, or died

    def next_message(self) -> RolloutMessage:
        """Return the next batch; raise ``GeneratorError`` if the child failed or died."""
        while True:
            try:
                message = self._inbox.get(timeout=_POLL)
            except queue.Empty:
                if self.process.is_alive() or self._thread.is_alive():
                    continue  # a dead child's last bytes may still be in the pipe: read them first
                message = None
            if isinstance(message, RolloutMessage):
                return message
            if isinstance(message, GeneratorFailure):
                self.process.join(timeout=5)
                raise GeneratorError(
                    f"the generator process raised (at step {message.step}): {message.error}\n"
                    f"--- generator traceback ---\n{message.traceback}",
                    exitcode=self.process.exitcode,
                    remote_traceback=message.traceback,
                )
            self.process.join(timeout=5)
            raise GeneratorError(
                f"the generator process (pid {self.pid}) died without reporting an error: "
                f"{describe_exit(self.process.exitcode)}",
                exitcode=self.process.exitcode,
            )

    def stop(self, grace: float = 2.0) -> None:
        """Stop the child and reap it: stop event, then SIGTERM, then SIGKILL."""
        self._stop.set()
        self.process.join(timeout=grace)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._thread.join(timeout=2 * _POLL + 1)
        self._reader.close()


def describe_exit(exitcode: int | None) -> str:
    """``exit code 1`` / ``killed by signal SIGKILL`` / ``still running``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
