"""The environment registry: versioned Gymnasium ids, short names, and user classes by path.

``make_env(spec, **kwargs)`` accepts, in this order:

1. a short name for the command line: ``gsm8k``, ``math``, ``code``, ``code-multiturn``,
   ``arithmetic`` (and any registered with ``register(..., short_name=...)``);
2. a Gymnasium id: ``rlvr/GSM8K-v0`` (anything in ``gymnasium.registry``);
3. ``package.module:ClassName`` or ``path/to/file.py:ClassName``: a user's environment
   class (or any callable returning a ``gymnasium.Env``), loaded without editing rlvr;
   ``module:Env-v0`` (Gymnasium's "import the module, then make the id") works too.

Keyword arguments pass through to the constructor (the trainer's ``--env-kwargs`` JSON,
parsed by ``parse_env_kwargs``). Importing this module registers the built-in
environments with Gymnasium, so after ``import rlvr.envs.registry``,
``gymnasium.make("rlvr/GSM8K-v0")`` works (or, without the import,
``gymnasium.make("rlvr.envs.registry:rlvr/GSM8K-v0")``).

``register`` refuses an id that is already taken, naming where both registrations came
from (file and line), because Gymnasium's own ``register`` only warns and silently
replaces the first environment. ``make_env`` builds environments without Gymnasium's
wrappers (``PassiveEnvChecker``, ``OrderEnforcing``): the trainer gets the env itself,
and the checker in ``rlvr.envs.checker`` is the place for contract checks.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium


class RegistryError(ValueError):
    """An unknown environment name, a duplicate id, or a spec that cannot be loaded."""


@dataclass(frozen=True)
class EnvEntry:
    """One registration: the id, its entry point, and where ``register`` was called."""

    env_id: str
    entry_point: str
    short_name: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """``file:line`` of the ``register`` call (for duplicate-id messages)."""


_ENTRIES: dict[str, EnvEntry] = {}
_SHORT_NAMES: dict[str, str] = {}
_FILE_MODULES: dict[Path, Any] = {}


def _caller(depth: int) -> str:
    frame = sys._getframe(depth + 1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def register(
    env_id: str,
    entry_point: str,
    *,
    short_name: str | None = None,
    kwargs: dict[str, Any] | None = None,
    _stack_depth: int = 1,
) -> EnvEntry:
    """Register ``env_id`` (``namespace/Name-vN``) with Gymnasium and with rlvr.

    Args:
        env_id: Versioned Gymnasium id, e.g. ``"myproject/Reverse-v0"``.
        entry_point: ``"module:Class"`` (imported lazily, on first ``make``).
        short_name: Optional command-line alias (``--env reverse``).
        kwargs: Default constructor arguments; ``make_env`` kwargs override them.

    Raises:
        RegistryError: ``env_id`` or ``short_name`` is taken; the message names both
            registration sites.
    """
    source = _caller(_stack_depth)
    if env_id in _ENTRIES:
        raise RegistryError(
            f"environment id {env_id!r} is already registered at {_ENTRIES[env_id].source} "
            f"(entry point {_ENTRIES[env_id].entry_point}); second registration at {source} "
            f"(entry point {entry_point}). Bump the version (-v1) or pick another name."
        )
    if env_id in gymnasium.registry:
        other = gymnasium.registry[env_id].entry_point
        raise RegistryError(
            f"environment id {env_id!r} is already in gymnasium's registry (entry point "
            f"{other}, registered outside rlvr); second registration at {source}."
        )
    if short_name is not None and short_name in _SHORT_NAMES:
        first = _ENTRIES[_SHORT_NAMES[short_name]]
        raise RegistryError(
            f"short name {short_name!r} already names {first.env_id} (registered at {first.source}); "
            f"second registration of it at {source} for {env_id}"
        )
    gymnasium.register(id=env_id, entry_point=entry_point, kwargs=dict(kwargs or {}), order_enforce=False)
    entry = EnvEntry(env_id, entry_point, short_name, dict(kwargs or {}), source)
    _ENTRIES[env_id] = entry
    if short_name is not None:
        _SHORT_NAMES[short_name] = env_id
    return entry


def unregister(env_id: str) -> None:
    """Remove ``env_id`` from rlvr's and Gymnasium's registries (for tests and notebooks)."""
    entry = _ENTRIES.pop(env_id, None)
    if entry is None:
        raise RegistryError(f"{env_id!r} is not registered through rlvr")
    if entry.short_name is not None:
        _SHORT_NAMES.pop(entry.short_name, None)
    gymnasium.registry.pop(env_id, None)


def list_envs() -> list[EnvEntry]:
    """Every environment registered through rlvr, in registration order."""
    return list(_ENTRIES.values())


def resolve_name(name: str) -> str:
    """Return the Gymnasium id of a short name; any other string unchanged."""
    return _SHORT_NAMES.get(name, name)


def parse_env_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--env-kwargs`` JSON (``'{"max_turns": 3}'``) into constructor kwargs."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--env-kwargs is not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--env-kwargs must be a JSON object like '{{\"max_turns\": 3}}', got {text!r}")
    return value


def make_env(name_or_spec: str, **kwargs: Any) -> gymnasium.Env:
    """Build an environment from a short name, a Gymnasium id, or ``module/file:Class``.

    Raises:
        RegistryError: unknown name (with the known ones and a close match), or a
            module, file or attribute that cannot be loaded.
        TypeError: the loaded object did not build a ``gymnasium.Env``.
    """
    env_id = resolve_name(name_or_spec)
    if env_id in gymnasium.registry:
        env = gymnasium.make(env_id, disable_env_checker=True, **kwargs)
        return _unwrap_order_enforcing(env)
    if ":" in name_or_spec:
        return _make_from_spec(name_or_spec, kwargs)
    known = sorted(_SHORT_NAMES) + sorted(_ENTRIES)
    close = difflib.get_close_matches(name_or_spec, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RegistryError(
        f"unknown environment {name_or_spec!r}.{hint} Known: {', '.join(known)}; or pass "
        "'package.module:ClassName' or 'path/to/file.py:ClassName'."
    )


def _unwrap_order_enforcing(env: gymnasium.Env) -> gymnasium.Env:
    # Environments registered elsewhere may still carry OrderEnforcing; rlvr's own are
    # registered with order_enforce=False, so this is usually a no-op.
    while isinstance(env, gymnasium.wrappers.OrderEnforcing):
        env = env.env
    return env


def _make_from_spec(spec: str, kwargs: dict[str, Any]) -> gymnasium.Env:
    target, _, attr = spec.rpartition(":")
    module = _load_file(Path(target)) if _looks_like_path(target) else _import(target, spec)
    if not hasattr(module, attr):
        if attr in gymnasium.registry:  # Gymnasium style "module:Env-v0": the import registered it
            return _unwrap_order_enforcing(gymnasium.make(attr, disable_env_checker=True, **kwargs))
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise RegistryError(f"{target} has no attribute {attr!r} (it defines: {', '.join(public)})")
    factory = getattr(module, attr)
    if not callable(factory):
        raise RegistryError(f"{spec} is a {type(factory).__name__}, not an environment class")
    env = factory(**kwargs)
    if not isinstance(env, gymnasium.Env):
        raise TypeError(
            f"{spec}(**kwargs) returned {type(env).__name__}, not a gymnasium.Env: "
            "environments must subclass gymnasium.Env (or rlvr.envs.base.TextEnv)"
        )
    return env


def _looks_like_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import {module_name!r} for --env {spec!r}: {e}") from e


def _load_file(path: Path) -> Any:
    """Import a ``.py`` file once per resolved path.

    A second make_env reuses the module, so registrations inside the file do not run twice.
    """
    resolved = path.expanduser().resolve()
    if resolved in _FILE_MODULES:
        return _FILE_MODULES[resolved]
    if not resolved.is_file():
        raise RegistryError(f"no such file: {path}")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"rlvr_user_env_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RegistryError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # In sys.modules before exec: dataclasses and pickling look the module up by name.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _FILE_MODULES[resolved] = module
    return module


def _register_builtins() -> None:
    builtins = [
        ("rlvr/GSM8K-v0", "rlvr.envs.math_envs:GSM8KEnv", "gsm8k"),
        ("rlvr/MATH-v0", "rlvr.envs.math_envs:MathEnv", "math"),
        ("rlvr/Code-v0", "rlvr.envs.code_envs:CodeEnv", "code"),
        ("rlvr/CodeMultiTurn-v0", "rlvr.envs.code_envs:CodeMultiTurnEnv", "code-multiturn"),
        ("rlvr/Arithmetic-v0", "rlvr.envs.arithmetic:ArithmeticEnv", "arithmetic"),
    ]
    for env_id, entry_point, short in builtins:
        if env_id not in _ENTRIES:
            register(env_id, entry_point, short_name=short, _stack_depth=2)


_register_builtins()
