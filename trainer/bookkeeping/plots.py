"""Learning-curve figures from metrics.jsonl: one PNG per question a user asks of a run.

``python scripts/plot.py RUN_DIR [RUN_DIR ...] [--output-dir DIR] [--smooth W]`` draws, per
figure, one panel per metric against ``step``, every run overlaid in its own colour
(legend: the run directory's name):

- ``reward.png``: ``reward_mean``, ``dynamic/reward_mean_sampled`` (with dynamic sampling:
  every episode played, where ``reward_mean`` is the learned batch's) and each
  ``components/<name>_mean`` (``overlong`` among them with ``--overlong-buffer``);
- ``kl.png``: ``kl`` (to the reference, k3) and ``behavior_kl`` (proximal vs behaviour policy);
- ``entropy.png``; ``clipping.png``: ``clip_low_fraction``, ``clip_high_fraction``,
  ``is_capped_fraction``; ``length.png``: ``completion_length_mean`` / ``_max``,
  ``truncated_fraction``;
- ``async.png`` (asynchronous runs): ``staleness_mean``, ``async/learner_idle_fraction``,
  ``async/generator_idle_fraction``; ``eval.png``: ``eval/pass@1``, ``eval/reward_mean``;
- ``dynamic.png`` (``--dynamic-sampling``): ``dynamic/groups_sampled``, ``_dropped``,
  ``_short`` and ``dynamic/rounds``.

Per-step values of a few dozen episodes are noisy, so each curve is a trailing moving
average over ``W`` steps (fewer at the start), with the raw values drawn faint behind it;
``W <= 1`` draws the raw values alone. A panel no run has data for is left out; a figure
with no panel left is skipped and reported (a synchronous run has no ``async.png``).
Missing values (absent keys, ``null`` for NaN) are gaps, not zeros.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global
state), so this runs on a headless machine and inside tests.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlvr.datasets.loaders import DataError, read_rows

DEFAULT_SMOOTH = 10
"""Moving-average window in steps: long enough to calm a 32-episode reward, short next to a 200-step run."""


class PlotError(ValueError):
    """A run directory or its metrics.jsonl cannot be read; the message names the file (and line)."""


@dataclass(frozen=True)
class FigureSpec:
    """One PNG: its file stem, a title, and the metric keys of its panels (``*`` globs allowed)."""

    name: str
    title: str
    keys: tuple[str, ...]


FIGURES = (
    FigureSpec("reward", "Reward and its components", ("reward_mean", "dynamic/reward_mean_sampled",
                                                       "components/*_mean")),
    FigureSpec("kl", "KL divergence", ("kl", "behavior_kl")),
    FigureSpec("entropy", "Policy entropy (nats per token)", ("entropy",)),
    FigureSpec("clipping", "Clipped tokens", ("clip_low_fraction", "clip_high_fraction", "is_capped_fraction")),
    FigureSpec("length", "Completion length (tokens)", ("completion_length_mean", "completion_length_max",
                                                       "truncated_fraction")),
    FigureSpec("async", "Asynchronous pipeline", ("staleness_mean", "async/learner_idle_fraction",
                                                  "async/generator_idle_fraction")),
    FigureSpec("eval", "Evaluation during training", ("eval/pass@1", "eval/reward_mean")),
    FigureSpec("dynamic", "Dynamic sampling (groups per step)", ("dynamic/groups_sampled", "dynamic/groups_dropped",
                                                                 "dynamic/groups_short", "dynamic/rounds")),
)  # fmt: skip


@dataclass
class Run:
    """A run's label (its directory's name) and its metrics.jsonl records, in file order."""

    label: str
    records: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """Return (steps, values) of ``key`` where it is a finite number; other steps are gaps."""
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
                steps.append(float(r["step"]))
                values.append(float(v))
        return steps, values


def read_run(path: str | Path) -> Run:
    """Read a run directory's metrics.jsonl (or that file itself), with errors that name the file and line."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        what = "no metrics.jsonl in it" if path.is_dir() else "no such directory or file"
        raise PlotError(f"{path}: {what} (expected a train.py --output-dir holding metrics.jsonl)")
    try:
        records = [record for _, record in read_rows(metrics)]
    except DataError as e:
        raise PlotError(f"{e.path}:{e.row}: malformed line: {e.problem}") from None
    label = (metrics.parent if metrics.name == "metrics.jsonl" else metrics).resolve().name
    return Run(label, records)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (fewer at the start, so the curve starts at step 1)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def panel_keys(spec: FigureSpec, runs: list[Run]) -> list[str]:
    """Expand the figure's key patterns against the runs' keys; keep those some run has a number for."""
    present = {k for run in runs for r in run.records for k in r}
    keys: list[str] = []
    for pattern in spec.keys:
        matches = sorted(k for k in present if fnmatch.fnmatchcase(k, pattern)) if "*" in pattern else [pattern]
        keys += [k for k in matches if k not in keys and any(run.series(k)[0] for run in runs)]
    return keys


def draw_figure(spec: FigureSpec, keys: list[str], runs: list[Run], window: int, path: Path) -> None:
    """Draw one panel per key, each run in its colour (smoothed over ``window``, raw faint behind), to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for run, color in zip(runs, colors):
            steps, values = run.series(key)
            if not steps:
                continue
            if window > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1.0)
            ax.plot(steps, smooth(values, window), color=color, linewidth=1.8, marker="." if len(steps) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    # The legend names the runs drawn here: a synchronous run has no line in async.png.
    shown = [(run, c) for run, c in zip(runs, colors) if any(run.series(k)[0] for k in keys)]
    handles = [Line2D([], [], color=c, linewidth=2) for _, c in shown]
    fig.legend(handles, [run.label for run, _ in shown], loc="outside lower center", ncols=min(len(shown), 4),
               frameon=False)  # fmt: skip
    note = f"; moving average over {window} steps, raw values faint" if window > 1 else ""
    fig.suptitle(f"{spec.title}{note}", fontsize=11)
    fig.savefig(path)


def unique_labels(runs: list[Run], paths: list[str | Path]) -> None:
    """Label runs whose directory names collide by the path as given, so the legend tells them apart."""
    names = [r.label for r in runs]
    for run, path in zip(runs, paths):
        if names.count(run.label) > 1:
            run.label = str(path)


def plot_runs(
    run_dirs: list[str | Path], output_dir: str | Path | None = None, window: int = DEFAULT_SMOOTH
) -> tuple[list[Path], list[str]]:
    """Write every figure some run has data for; return (PNG paths written, one line per figure skipped).

    ``output_dir`` defaults to the first run directory's ``plots/``.
    """
    if not run_dirs:
        raise PlotError("no run directory given")
    runs = [read_run(d) for d in run_dirs]
    unique_labels(runs, run_dirs)
    first = Path(run_dirs[0])
    out = Path(output_dir) if output_dir is not None else (first if first.is_dir() else first.parent) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for spec in FIGURES:
        keys = panel_keys(spec, runs)
        if not keys:
            skipped.append(f"skipped {spec.name}.png: no run has {', '.join(spec.keys)}")
            continue
        path = out / f"{spec.name}.png"
        draw_figure(spec, keys, runs, window, path)
        written.append(path)
    return written, skipped
