"""Ctrl-C and SIGTERM end the step in progress, save it, and a resumed run goes on as if uninterrupted.

The runs here checkpoint only at their end (``--checkpoint-every`` 0, the default), so
without the save on stop an interrupted run would lose every step it took. The signal is
sent from outside, as a user or a scheduler does; which step it lands in depends on timing,
and the test holds for any of them: the run stops after that step, saved, and the resumed
run's metrics equal an uninterrupted run's step for step (every key but wall-clock timings).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import saved_on_stop
from test_kill_resume import ENV, ROOT, _comparable, _records, wait_for_step

from rlvr.trainer.bookkeeping.interrupt import GracefulStop, StopSignal

STEPS = 6
FLAGS = ["--env", "arithmetic", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
         "--no-progress", "--torch-threads", "2", "--max-steps", str(STEPS), "--samples-every", "0"]  # fmt: skip


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, "--output-dir", str(out), *extra]


def _signal_after_step(out: Path, step: int, signum: int, extra: list[str]) -> tuple[int, str]:
    """Start a run, send ``signum`` once ``step`` is in its metrics; return its exit status and stderr."""
    proc = subprocess.Popen(_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**ENV, "PYTHONFAULTHANDLER": "1"})  # fmt: skip
    try:
        wait_for_step(proc, out, step)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stderr


@pytest.mark.parametrize(
    ("signum", "extra"),
    [(signal.SIGINT, []), (signal.SIGTERM, ["--max-staleness", "1"])],
    ids=["sigint-sync", "sigterm-async-eta1"],
)
def test_a_signal_saves_the_step_in_progress_and_resume_matches_an_uninterrupted_run(tmp_path, signum, extra):
    whole = subprocess.run(_cmd(tmp_path / "whole", *extra), capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env=ENV)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = tmp_path / "stopped"
    status, stderr = _signal_after_step(stopped, 2, signum, extra)
    assert status == 128 + signum, stderr[-3000:]
    name, step = saved_on_stop(stopped, stderr)
    assert name == signal.Signals(signum).name and 2 <= step < STEPS
    saved = stopped / "checkpoints" / f"step_{step:06d}"
    if "--max-staleness" in extra:  # the weights the next batch samples with, for an exact resume
        assert (saved / "lagged_weights" / f"version_{step - 1:06d}.safetensors").is_file()
    resumed = subprocess.run(_cmd(stopped, "--resume", "auto", *extra), capture_output=True, text=True, timeout=300,
                             cwd=ROOT, env=ENV)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _records(tmp_path / "whole"), _records(stopped)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(want, got):
        assert _comparable(b) == _comparable(a), f"step {a['step']} differs"


def test_the_first_signal_is_noted_the_second_stops_at_once_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert stop.requested and stop.signum == signal.SIGTERM  # noted, nothing raised
        with pytest.raises(StopSignal) as raised:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert raised.value.signum == signal.SIGINT and raised.value.step is None and raised.value.exit_status == 130
    assert {s: signal.getsignal(s) for s in before} == before


def test_end_of_step_saves_what_is_due_and_the_step_a_signal_came_in(tmp_path):
    saved: list[int] = []

    def save(step: int) -> Path:
        saved.append(step)
        return tmp_path / f"step_{step}"

    stop = GracefulStop(enabled=False)  # the signal is set by hand: this test is about the step boundary
    assert stop.end_of_step(1, 10, 0, save) is None and saved == []  # nothing due
    assert stop.end_of_step(3, 10, 3, save) == tmp_path / "step_3" and saved == [3]  # every 3 steps
    assert stop.end_of_step(10, 10, 0, save) == tmp_path / "step_10" and saved == [3, 10]  # the last step
    stop.signum = signal.SIGTERM
    with pytest.raises(StopSignal) as raised:
        stop.end_of_step(4, 10, 3, save)  # not due, but a signal came: saved, then stopped
    assert saved == [3, 10, 4]
    assert (raised.value.signum, raised.value.step, raised.value.checkpoint) == (signal.SIGTERM, 4, tmp_path / "step_4")
    assert raised.value.exit_status == 143
    assert stop.end_of_step(10, 10, 0, save) == tmp_path / "step_10"  # at the last step the run just ends


def test_disabled_or_off_the_main_thread_it_changes_nothing():
    with GracefulStop(enabled=False) as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: at once
        time.sleep(1)
    assert not stop.requested
    found: list[bool] = []
    thread = threading.Thread(target=lambda: found.append(GracefulStop().enabled))
    thread.start()
    thread.join()
    assert found == [False]  # Python can set signal handlers only in the main thread
