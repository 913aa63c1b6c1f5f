"""Trackers: TensorBoard holds exactly metrics.jsonl's numbers and the samples; resume; W&B and its absence."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_plot import ROOT, train_run

from rlvr.trainer.bookkeeping.metrics import RunLog, read_metrics
from rlvr.trainer.bookkeeping.trackers import TENSORBOARD_DIR, WANDB_ID_FILE, TensorBoardTracker, TrackerError, scalars
from rlvr.trainer.config import TrainConfig


def events(output_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(output_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("run"))  # 4 steps, samples every 2


def test_tensorboard_scalars_equal_metrics_jsonl_step_by_step(run):
    records, acc = read_metrics(run / "metrics.jsonl"), events(run)
    numeric = {k for r in records for k in scalars(r)}
    assert "reward_mean" in numeric and "time/step" in numeric
    assert set(acc.Tags()["scalars"]) == numeric
    for key in numeric:
        logged = {e.step: e.value for e in acc.Scalars(key)}
        expected = {r["step"]: float(r[key]) for r in records if key in scalars(r)}
        assert logged.keys() == expected.keys(), key
        for step, value in expected.items():
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)  # float32 in the file


def test_tensorboard_has_the_samples_as_text_on_the_samples_steps(run):
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in events(run).Tensors("samples/text_summary")}
    assert sorted(texts) == sorted({s["step"] for s in samples}) == [2, 4]
    for s in samples:
        text = texts[s["step"]]
        assert s["completions"][0] in text and s["reason"] in text
        assert s["prompt"].split("What is")[1].split("?")[0] in text  # the question itself


def test_only_finite_numbers_are_dashboard_scalars():
    record = {"step": 3, "a": 1, "b": 0.5, "nan": math.nan, "none": None, "text": "x", "flag": True}
    assert scalars(record) == {"a": 1.0, "b": 0.5}


def _write(tracker: TensorBoardTracker, values: dict[int, float]) -> None:
    for step, value in values.items():
        tracker.log(step, {"step": step, "reward_mean": value})
    tracker.close()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint_and_a_fresh_run_replaces_all(tmp_path):
    _write(TensorBoardTracker(tmp_path, resume_step=None), {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0})
    _write(TensorBoardTracker(tmp_path, resume_step=2), {3: 30.0, 4: 40.0, 5: 50.0})  # crashed after 4, resumed at 2
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("reward_mean")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)
    ]  # fmt: skip
    _write(TensorBoardTracker(tmp_path, resume_step=None), {1: -1.0})  # a new run into the same directory
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("reward_mean")] == [(1, -1.0)]


def test_wandb_project_without_wandb_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    config = TrainConfig(output_dir=str(tmp_path), wandb_project="p")
    with pytest.raises(TrackerError, match=r"pip install 'rlvr\[wandb\]'"):
        RunLog(tmp_path, None, 0, None, config=config)
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    assert train_script.main(["--wandb-project", "p", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--wandb-project needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install 'rlvr[wandb]')")
def test_wandb_offline_logs_scalars_and_samples_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = TrainConfig(output_dir=str(tmp_path), wandb_project="rlvr-test")
    log = RunLog(tmp_path, None, 0, None, config=config)
    wandb_tracker = log.trackers[-1]
    for step in (1, 2, 3):
        log.write({"step": step, "reward_mean": step / 4, "note": "text"}, rollouts=None)
    wandb_tracker.log_samples(3, [{"step": 3, "prompt": "What is 2+2?", "completions": ["4"], "reward": 1.0}])
    # W&B sends a step's row when the next step begins (the last one at close): step 2's is out.
    assert wandb_tracker.run.summary["reward_mean"] == 0.5
    assert "note" not in wandb_tracker.run.summary.keys()  # text is JSONL-only
    assert wandb_tracker.run.config["wandb_project"] == "rlvr-test"
    log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    (first,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    (table,) = first.glob("files/media/table/samples_3_*.table.json")
    assert "What is 2+2?" in table.read_text()
    RunLog(tmp_path, 2, 0, None, config=config).close()  # resumed from step 2: the same W&B run
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install 'rlvr[wandb]')")
@pytest.mark.parametrize("loop", [[], ["--max-staleness", "1"]], ids=["sync", "async"])
def test_train_py_wandb_project_logs_every_step_offline(tmp_path, monkeypatch, loop):
    """Both loops hand their config to RunLog, so --wandb-project reaches W&B from the command line."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train_run(tmp_path / "run", "--wandb-project", "rlvr-test", *loop, steps=2)
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    (offline,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    history = next(offline.glob("run-*.wandb")).read_bytes()  # W&B's own record log, what `wandb sync` uploads
    assert history.count(b"reward_mean") >= 2 and b"loss" in history  # a row per step, keys as metrics.jsonl's
    (table,) = offline.glob("files/media/table/samples_2_*.table.json")  # samples.jsonl's step 2 (--samples-every 2)
    assert json.loads(table.read_text())["data"]
