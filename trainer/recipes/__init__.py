"""Recipes: named presets of ``TrainConfig`` values from published methods, shipped as YAML.

A recipe file ``NAME.yaml`` in this folder holds

    name: DAPO                       # how the method is called
    paper: "Yu et al. 2025, ..."     # where its values come from
    from_paper: [epsilon_high, ...]  # the settings taken from the paper itself
    settings: {field: value, ...}    # TrainConfig fields, as in a --config file

``from_paper`` keeps the record honest: a setting not named there is rlvr's choice for the
default model (a budget scaled to 64 tokens, say), and the file's comments say why.
``train.py --recipe dapo`` layers the settings under ``--config`` and the flags
(defaults < recipe < --config < flags; ``--print-config`` shows the result), and
``config.yaml`` of the run records ``recipe: dapo`` beside the resolved values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    """One shipped preset: the method, its paper, and the config values it sets."""

    key: str
    """The file's stem, the value of ``--recipe``."""
    name: str
    paper: str
    from_paper: tuple[str, ...]
    settings: dict[str, Any]


def recipe_names() -> list[str]:
    """Return the recipes shipped with rlvr, by ``--recipe`` value."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(key: str) -> Recipe:
    """Read recipe ``key``; a ValueError names the known ones, or what is wrong in the file."""
    path = RECIPES_DIR / f"{key}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {key!r}; choose one of {recipe_names()}")
    raw = yaml.safe_load(path.read_text())
    want = {"name": str, "paper": str, "from_paper": list, "settings": dict}
    if not isinstance(raw, dict) or set(raw) != set(want):
        raise ValueError(f"{path}: a recipe is a mapping of exactly {sorted(want)}")
    for k, kind in want.items():
        if not isinstance(raw[k], kind):
            raise ValueError(f"{path}: {k} must be a {kind.__name__}, got {raw[k]!r}")
    settings = {str(k).replace("-", "_"): v for k, v in raw["settings"].items()}
    missing = [k for k in raw["from_paper"] if k not in settings]
    if missing:
        raise ValueError(f"{path}: from_paper names {missing}, which settings does not set")
    return Recipe(key, raw["name"], raw["paper"], tuple(raw["from_paper"]), settings)
