"""The command line of ``train.py``: a flag per ``TrainConfig`` field, ``--config``, ``--recipe``.

Precedence: defaults < ``--recipe NAME`` (a preset shipped in ``trainer/recipes/``) <
``--config FILE.yaml`` < command-line flags. YAML keys are the field names (``max_steps``
or ``max-steps``); an unknown key is an error that suggests the closest field, so a typo
never silently trains with a default. ``--print-config`` prints the result as YAML
(``config.config_yaml``) and exits; every run writes the same text to
``OUTPUT_DIR/config.yaml``, and that file is a valid ``--config``. Help texts are the
fields' docstrings in ``config.py``, read here, so the two never disagree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from rlvr.envs.registry import parse_env_kwargs
from rlvr.trainer.config import ConfigError, TrainConfig, config_yaml
from rlvr.trainer.recipes import load_recipe


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Return the attribute docstrings of a dataclass (the string after each field), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def json_object_arg(text: str) -> dict[str, Any]:
    """Argparse type for a JSON object flag; the one parser is ``rlvr.envs.registry.parse_env_kwargs``."""
    try:
        return parse_env_kwargs(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's message as is
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """Build flags for every ``TrainConfig`` field (``--max-steps`` for ``max_steps``) plus ``--config``.

    Defaults are suppressed so that only flags given on the command line override the file.
    """
    parser = argparse.ArgumentParser(
        description="Train a language model with GRPO on an rlvr environment.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of TrainConfig fields.")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="Print the resolved configuration (defaults < --recipe < --config < flags) as YAML and exit.",
    )
    # The deepspeed launcher appends --local_rank=N to the script's arguments; the rank is
    # read from the environment (LOCAL_RANK, which both launchers set), so it is accepted and dropped.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.name == "resume":
            # A bare --resume means 'auto'.
            parser.add_argument(flag, nargs="?", const="auto", metavar="DIR|auto|latest", **kwargs)
        elif f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in ("env_kwargs", "eval_env_kwargs"):
            parser.add_argument(flag, type=json_object_arg, metavar="JSON", **kwargs)
        else:
            parser.add_argument(flag, type=_FIELD_TYPES.get(str(f.type), str), **kwargs)
    return parser


_FIELD_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of field names (``-`` or ``_`` spelling) to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(raw).__name__}")
    return known_fields({str(k).replace("-", "_"): v for k, v in raw.items()}, f"config file {path}")


def known_fields(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Return ``values`` if every key is a ``TrainConfig`` field; else a ConfigError suggesting the closest."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown field {key!r}{hint}")
    return values


def recipe_values(key: str) -> dict[str, Any]:
    """Return the settings of recipe ``key`` plus ``recipe: key`` itself; a ConfigError if unknown or malformed."""
    try:
        recipe = load_recipe(key)
    except ValueError as e:
        raise ConfigError(f"recipe: {e}") from None
    return known_fields(dict(recipe.settings), f"recipe {key}") | {"recipe": key}


def recipe_config(key: str, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` of recipe ``key`` with ``overrides`` on top: ``--recipe key`` from Python."""
    return TrainConfig(**(recipe_values(key) | overrides))


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Build and validate the config from ``argv``: defaults < ``--recipe`` < ``--config`` file < flags.

    The recipe is the one the flags name, else the one the config file names.

    Exits with a usage error (status 2) naming the bad field, as argparse does for its own;
    with ``--print-config``, prints the resolved config and exits with status 0, as ``--help`` does.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("local_rank", None)
    print_config = args.pop("print_config", False)
    try:
        file_values = load_yaml(args.pop("config")) if "config" in args else {}
        recipe = args.get("recipe", file_values.get("recipe"))
        values = recipe_values(recipe) if recipe is not None else {}
        config = TrainConfig(**(values | file_values | args))
    except (ConfigError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
    if print_config:
        sys.stdout.write(config_yaml(config))
        sys.exit(0)
    return config
