"""scripts/plot.py on real runs (one synchronous, one asynchronous): the PNGs exist, overlay, and are not blank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rlvr.trainer.bookkeeping.plots import FIGURES, PlotError, Run, panel_keys, read_run, smooth

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--env", "arithmetic", "--group-size", "4", "--prompts-per-step", "2", "--max-new-tokens", "8",
         "--no-progress", "--torch-threads", "2", "--samples-every", "2"]  # fmt: skip
RUN_COLOURS = {"sync": (0x1F, 0x77, 0xB4), "async": (0xFF, 0x7F, 0x0E)}
"""matplotlib's C0 and C1: the first and second run directory given to plot.py."""
EXPECTED = {"reward", "kl", "entropy", "clipping", "length", "async"}


def train_run(out: Path, *args: str, steps: int = 4) -> Path:
    """Run scripts/train.py for ``steps`` small steps into ``out``; return ``out``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *SMALL, "--max-steps", str(steps),
           "--output-dir", str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def plot(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "plot.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {"sync": train_run(base / "sync"), "async": train_run(base / "async", "--max-staleness", "1")}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # [height, width, 3]


def colour_count(image: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((image == np.array(rgb)).all(axis=-1).sum())


def test_two_runs_overlaid_every_figure_with_data_and_not_blank(runs, tmp_path):
    proc = plot(runs["sync"], runs["async"], "--output-dir", tmp_path, "--smooth", "2")
    assert proc.returncode == 0, proc.stderr
    assert {p.stem for p in tmp_path.glob("*.png")} == EXPECTED
    assert "skipped eval.png" in proc.stdout  # no --eval-every: no data, and a line says so
    for name in EXPECTED:
        image = pixels(tmp_path / f"{name}.png")
        height, width, _ = image.shape
        assert width >= 500 and height >= 300, (name, image.shape)
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100, f"{name}.png has too few colours"
        non_white = (image < 250).any(axis=-1).mean()
        assert 0.02 < non_white < 0.6, f"{name}.png: {non_white:.3f} of its pixels are not white"
        # The asynchronous run is drawn in every figure; the synchronous one in all but async.png
        # (where the two runs' curves coincide, as at a clip fraction of 0, the legend still shows it).
        assert colour_count(image, RUN_COLOURS["async"]) > 20, name
        if name != "async":
            assert colour_count(image, RUN_COLOURS["sync"]) > 20, name
    assert colour_count(pixels(tmp_path / "async.png"), RUN_COLOURS["sync"]) == 0  # no line, no legend entry


def test_default_output_is_the_first_run_dirs_plots_and_a_sync_run_has_no_async_figure(runs):
    proc = plot(runs["sync"], "--smooth", "1")
    assert proc.returncode == 0, proc.stderr
    out = runs["sync"] / "plots"
    assert {p.stem for p in out.glob("*.png")} == EXPECTED - {"async"}
    assert "skipped async.png: no run has staleness_mean" in proc.stdout
    assert f"wrote {out / 'reward.png'}" in proc.stdout


def test_a_run_dir_without_metrics_is_an_error_that_names_it(tmp_path):
    proc = plot(tmp_path)
    assert proc.returncode == 2
    assert f"error: {tmp_path}: no metrics.jsonl in it" in proc.stderr
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    ("bad", "what"),
    [("{not json", "invalid JSON"), ("[1, 2]", "row is a JSON list, not an object")],
    ids=["json", "list"],
)
def test_a_malformed_line_is_an_error_with_file_and_line_number(tmp_path, bad, what):
    good = json.dumps({"step": 1, "reward_mean": 0.5})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n")
    proc = plot(tmp_path)
    assert proc.returncode == 2
    assert f"{tmp_path / 'metrics.jsonl'}:3: malformed line: {what}" in proc.stderr
    with pytest.raises(PlotError, match=r"metrics\.jsonl:3: "):
        read_run(tmp_path)


def test_smoothing_is_a_trailing_moving_average_that_starts_at_the_first_point():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([1.0, 3.0, 5.0, 7.0], 3) == [1.0, 2.0, 3.0, 5.0]
    assert smooth([1.0, 3.0], 1) == [1.0, 3.0]


def test_missing_values_are_gaps_and_component_panels_come_from_the_runs():
    run = Run("r", [
        {"step": 1, "reward_mean": 0.5, "components/format_mean": 1.0, "components/format_std": 0.0},
        {"step": 2, "reward_mean": None, "components/correctness_mean": 0.25},
        {"step": 3, "reward_mean": 0.75, "kl": "n/a"},
    ])  # fmt: skip
    assert run.series("reward_mean") == ([1.0, 3.0], [0.5, 0.75])
    reward = next(f for f in FIGURES if f.name == "reward")
    expected = ["reward_mean", "components/correctness_mean", "components/format_mean"]
    assert panel_keys(reward, [run]) == expected
    assert panel_keys(next(f for f in FIGURES if f.name == "kl"), [run]) == []  # a string is not data
