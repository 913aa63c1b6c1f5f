#!/usr/bin/env python
"""The shipped recipes side by side: the same model, task, seeds and budget, one table and one figure.

    python scripts/bench_recipes.py                          # every recipe, 200 steps, seed 0
    python scripts/bench_recipes.py --recipes grpo dapo --steps 60 --seeds 0 1 --jobs 2

Each run is ``scripts/train.py --recipe R`` in its own process, exactly as a user would start
it, on ``arithmetic`` from the default model with the flags of the learning test
(``tests/test_learning.py``: 16 prompts x 8 completions, 8 new tokens, learning rate 4e-4,
one torch thread), so a recipe differs from another only by what its file sets. The
recipes' own values stay, with one exception: a budget in tokens that the 8-token budget
cannot hold (DAPO's overlong buffer, 13 of 64 tokens) is scaled to the same fifth of it.

The table, per recipe (means over the seeds):

- ``first10`` / ``2nd half``: the reward averaged over the first 10 steps and the run's second half, and
  ``rise``, their difference (``bookkeeping.metrics.reward_rise``: the learning test asks
  >= 0.3 of each recipe);
- ``to >= T``: the first step whose trailing 10-step mean reward reaches ``--threshold``
  ("-" if none does);
- ``s/step``: the median of ``time/step``; ``wall s``: the run, process start included.

The reward read is that of every episode the step played (``dynamic/reward_mean_sampled``
where a recipe drops groups, as DAPO does: its learned batch holds only the informative
groups, whose mean says nothing of the policy), else ``reward_mean``.

``--jobs N`` runs N recipes at once (each one torch thread): on the 2-core machine two at
a time halve the wall time, and time per step stays comparable, since every run has one core.
The figure, ``OUTPUT_DIR/recipes.png``, overlays the reward curves (moving average over 10
steps, raw values faint); ``OUTPUT_DIR/plots/`` gets the usual figures of ``scripts/plot.py``
for all runs together. Flags this script does not know go to every run's ``train.py``
(``--beta 0.01``, ``--generator vllm``), after the recipe's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rlvr.trainer.bookkeeping.metrics import RISE_FIRST_STEPS, reward_rise

ROOT = Path(__file__).resolve().parents[1]

LEARN_FLAGS = [
    "--env", "arithmetic",
    "--group-size", "8",
    "--prompts-per-step", "16",
    "--learning-rate", "4e-4",
    "--max-new-tokens", "8",
    "--micro-batch-size", "64",
    "--torch-threads", "1",
    "--samples-every", "0",
    "--no-progress",
]  # fmt: skip
"""The learning test's flags (tests/test_learning.py), but for steps and seed."""

BUDGET_FLAGS = {"dapo": ["--overlong-buffer", "2"]}
"""Token counts a recipe sets for a 64-token budget, scaled to the 8 tokens here (13/64 ~ 2/8)."""

REWARD_KEYS = ("dynamic/reward_mean_sampled", "reward_mean")
"""The reward read from each step's record: the first key present (see the module docstring)."""

WINDOW = 10


@dataclass
class RecipeRun:
    """One recipe's run on one seed: its reward curve and its speed."""

    recipe: str
    seed: int
    output_dir: Path
    rewards: list[float]
    step_seconds: list[float]
    wall_seconds: float

    @property
    def first(self) -> float:
        return reward_rise(self.rewards)[0]

    @property
    def last(self) -> float:
        return reward_rise(self.rewards)[1]

    def steps_to(self, threshold: float) -> int | None:
        """The first step whose trailing ``WINDOW``-step mean reward reaches ``threshold``."""
        for i in range(WINDOW, len(self.rewards) + 1):
            if statistics.fmean(self.rewards[i - WINDOW : i]) >= threshold:
                return i
        return None


def reward_of(record: dict) -> float:
    """The step's reward over every episode it played (see ``REWARD_KEYS``)."""
    key = next(k for k in REWARD_KEYS if k in record)
    return float(record[key])


def run_recipe(recipe: str, seed: int, steps: int, output_dir: Path, extra: list[str] = ()) -> RecipeRun:
    """Train ``recipe`` for ``steps`` on ``seed`` in a subprocess; raise with its stderr's tail if it fails."""
    out = output_dir / f"{recipe}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--recipe", recipe, *LEARN_FLAGS,
           *BUDGET_FLAGS.get(recipe, []), "--max-steps", str(steps), "--seed", str(seed), "--output-dir", str(out),
           *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} (seed {seed}) failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return RecipeRun(recipe, seed, out, [reward_of(r) for r in records], [r["time/step"] for r in records], wall)


def run_recipes(
    recipes: list[str], seeds: list[int], steps: int, output_dir: Path, jobs: int = 2, extra: list[str] = ()
) -> list[RecipeRun]:
    """Run every recipe on every seed, ``jobs`` at a time; return the runs in (recipe, seed) order."""
    work = [(r, s) for r in recipes for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_recipe, r, s, steps, output_dir, list(extra)) for r, s in work]
        return [f.result() for f in futures]


def table(runs: list[RecipeRun], threshold: float) -> str:
    """The side-by-side table, one row per recipe (means over its seeds)."""
    head = f"{'recipe':<14}{'seeds':>6}{'first10':>9}{'2nd half':>9}{'rise':>7}{f'to >= {threshold:g}':>10}"
    head += f"{'s/step':>8}{'wall s':>8}"
    lines = [head, "-" * len(head)]
    for recipe in dict.fromkeys(r.recipe for r in runs):
        mine = [r for r in runs if r.recipe == recipe]
        reached = [r.steps_to(threshold) for r in mine]
        to = "-" if None in reached else f"{statistics.fmean(reached):.0f}"  # type: ignore[arg-type]
        first, last = statistics.fmean(r.first for r in mine), statistics.fmean(r.last for r in mine)
        lines.append(
            f"{recipe:<14}{len(mine):>6}{first:>9.3f}{last:>9.3f}{last - first:>+7.3f}{to:>10}"
            f"{statistics.fmean(statistics.median(r.step_seconds) for r in mine):>8.3f}"
            f"{statistics.fmean(r.wall_seconds for r in mine):>8.0f}"
        )
    return "\n".join(lines)


def draw(runs: list[RecipeRun], output_dir: Path) -> list[Path]:
    """Write ``recipes.png`` (the reward curves overlaid) and the usual figures under ``plots/``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rlvr.trainer.bookkeeping.plots import plot_runs, smooth

    fig = Figure(figsize=(9.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        steps = list(range(1, len(run.rewards) + 1))
        ax.plot(steps, run.rewards, color=f"C{i % 10}", alpha=0.2, linewidth=1.0)
        ax.plot(
            steps,
            smooth(run.rewards, WINDOW),
            color=f"C{i % 10}",
            linewidth=1.8,
            label=f"{run.recipe} (seed {run.seed})",
        )
    ax.set(xlabel="step", ylabel="reward of every episode played",
           title=f"Recipes on arithmetic, default model: {WINDOW}-step moving average, raw values faint")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    path = output_dir / "recipes.png"
    fig.savefig(path)
    written, _ = plot_runs([r.output_dir for r in runs], output_dir / "plots")
    return [path, *written]


def main(argv: list[str] | None = None) -> int:
    from rlvr.trainer.recipes import recipe_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=recipe_names(), choices=recipe_names(), metavar="NAME")
    p.add_argument("--steps", type=int, default=200, help="training steps of each run (default 200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every recipe runs on each (default 0)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each (default 2)")
    p.add_argument("--threshold", type=float, default=0.5, help="reward for the 'steps to' column (default 0.5)")
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "bench_recipes")
    args, extra = p.parse_known_args(argv)
    if args.steps < 2 * RISE_FIRST_STEPS:
        p.error(f"--steps must be >= {2 * RISE_FIRST_STEPS}: the rise reads the first {RISE_FIRST_STEPS} steps")
    print(f"{len(args.recipes)} recipes x {len(args.seeds)} seeds, {args.steps} steps, {args.jobs} at a time",
          file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    runs = run_recipes(args.recipes, args.seeds, args.steps, args.output_dir, args.jobs, extra)
    print(table(runs, args.threshold))
    figures = draw(runs, args.output_dir)
    print(f"\n{time.perf_counter() - start:.0f} s in all; figure: {figures[0]} (and {len(figures) - 1} in plots/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
