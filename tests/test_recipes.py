"""Recipes: the shipped presets are well formed, layer under --config and the flags, and each one learns.

The fast tests read every file in ``trainer/recipes/`` and the command line around them. The
slow tests train each recipe on ``arithmetic`` from the default model with the learning test's
flags (``tests/test_learning.py``) and ask the rise that test asks (>= 0.3, the first 10 steps'
mean reward against the second half's: ``bookkeeping.metrics.reward_rise``). They run
through ``scripts/bench_recipes.py``, the benchmark that prints the recipes side by side, two
runs at a time (each on one torch thread, one core each).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlvr.trainer import recipes
from rlvr.trainer.bookkeeping.metrics import reward_rise
from rlvr.trainer.config import TrainConfig, config_yaml
from rlvr.trainer.flags import config_from_args, recipe_config, recipe_values

ROOT = Path(__file__).resolve().parents[1]
NAMES = recipes.recipe_names()
EXPECTED = {"grpo", "dapo", "dr-grpo", "gspo", "cispo", "rloo", "reinforce-pp"}


def test_the_issue_s_recipes_are_shipped():
    assert set(NAMES) == EXPECTED


@pytest.mark.parametrize("name", NAMES)
def test_a_recipe_names_its_paper_and_builds_a_config(name):
    recipe = recipes.load_recipe(name)
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", recipe.paper), recipe.paper
    assert recipe.from_paper and set(recipe.from_paper) <= set(recipe.settings)
    config = recipe_config(name)
    assert config.recipe == name
    for field, value in recipe.settings.items():
        assert getattr(config, field) == value, field


def test_each_recipe_differs_from_every_other():
    settings = {n: recipe_values(n) | {"recipe": None} for n in NAMES}
    resolved = {n: TrainConfig(**s).to_dict() for n, s in settings.items()}
    for a in NAMES:
        for b in NAMES:
            if a < b:
                assert resolved[a] != resolved[b], f"{a} and {b} set the same values"


def test_flags_and_config_file_override_the_recipe(tmp_path):
    config = config_from_args(["--recipe", "dapo", "--epsilon-high", "0.3"])
    assert (config.recipe, config.epsilon_high, config.dynamic_sampling) == ("dapo", 0.3, True)
    file = tmp_path / "run.yaml"
    file.write_text("recipe: gspo\nepsilon_high: 0.001\n")
    from_file = config_from_args(["--config", str(file)])
    assert (from_file.policy_loss, from_file.epsilon_high, from_file.epsilon_low) == ("gspo", 0.001, 0.0003)
    # The flags' recipe wins over the file's; the file's own values still lie over it.
    assert config_from_args(["--config", str(file), "--recipe", "cispo"]).policy_loss == "cispo"


def test_a_run_s_config_yaml_of_a_recipe_reloads_to_the_same_config():
    config = config_from_args(["--recipe", "dr-grpo", "--max-steps", "3"])
    assert TrainConfig(**yaml.safe_load(config_yaml(config))) == config


def test_print_config_shows_the_recipe_s_values():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--recipe", "gspo", "--print-config"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert (printed["recipe"], printed["policy_loss"], printed["epsilon_high"]) == ("gspo", "gspo", 0.0004)


def test_an_unknown_recipe_is_a_usage_error_that_lists_the_known(capsys):
    with pytest.raises(SystemExit) as e:
        config_from_args(["--recipe", "ppo-2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "ppo-2" in err and "dapo" in err


def test_a_malformed_recipe_file_names_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\npaper: p\nfrom_paper: [beta]\nsettings: {epsilon_high: 0.3}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: from_paper names \['beta'\]"):
        recipes.load_recipe("bad")
    (tmp_path / "typo.yaml").write_text("name: T\npaper: p\nfrom_paper: []\nsettings: {epsilon_hihg: 0.3}\n")
    with pytest.raises(ValueError, match="unknown field 'epsilon_hihg'; did you mean 'epsilon_high'"):
        recipe_values("typo")


# --- each recipe learns ----------------------------------------------------------------------

STEPS = 200
"""The learning test's steps (tests/test_learning.py)."""
RISE = 0.3
"""The learning test's bar: the mean reward of the last 10 steps exceeds the first 10's by this."""


def test_the_rise_compares_the_first_10_steps_with_the_second_half():
    rewards = [0.0] * 10 + [0.4] * 90 + [0.6] * 90 + [0.9] * 10  # a late spike is diluted
    start, end = reward_rise(rewards)
    assert start == 0.0 and end == pytest.approx((0.6 * 90 + 0.9 * 10) / 100)
    assert reward_rise([1.0] * 10 + [0.0] + [0.5] * 10) == (1.0, pytest.approx(0.5 * 10 / 11))  # the odd step: end
    with pytest.raises(ValueError, match="at least 20 steps"):
        reward_rise(rewards[:19])


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "scripts" / "bench_recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """Every recipe trained once, two at a time, and the figures: {recipe: RecipeRun, "figures": [paths]}."""
    bench, out = _bench(), tmp_path_factory.mktemp("recipes")
    runs = bench.run_recipes(NAMES, [0], STEPS, out, jobs=2)
    print("\n" + bench.table(runs, threshold=0.5))
    figures = bench.draw(runs, out)
    return {r.recipe: r for r in runs} | {"figures": figures}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_learns_arithmetic(learned, name):
    run = learned[name]
    assert len(run.rewards) == STEPS
    assert run.last - run.first >= RISE, f"{name}: reward rose only from {run.first:.3f} to {run.last:.3f}"


@pytest.mark.slow
def test_the_benchmark_draws_the_recipes_side_by_side(learned):
    figure, *plots = learned["figures"]
    assert figure.name == "recipes.png" and figure.stat().st_size > 10_000
    assert {p.name for p in plots} >= {"reward.png", "length.png"}
