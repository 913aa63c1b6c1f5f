"""The registry: short names, Gymnasium ids, user classes by module or file, duplicates."""

from __future__ import annotations

import sys
import textwrap

import gymnasium
import pytest

from rlvr.envs.arithmetic import ArithmeticEnv
from rlvr.envs.code_envs import CodeEnv, CodeMultiTurnEnv
from rlvr.envs.math_envs import GSM8KEnv, MathEnv
from rlvr.envs.registry import (
    RegistryError,
    list_envs,
    make_env,
    parse_env_kwargs,
    register,
    resolve_name,
    unregister,
)

USER_ENV = textwrap.dedent(
    """
    from rlvr.envs.base import Task, TextEnv
    from rlvr.verifiers.types import Verdict

    LOADS = []
    LOADS.append(1)  # counts executions of this file


    class EchoEnv(TextEnv):
        num_tasks = 10

        def __init__(self, word="hi", **kwargs):
            super().__init__(**kwargs)
            self.word = word

        def get_task(self, index):
            return Task(f"echo-{index}", f"Say {self.word}{index}", f"{self.word}{index}")

        def verify(self, completion, task):
            return Verdict(float(completion.strip() == task.reference), completion, "")


    def not_an_env(**kwargs):
        return 42
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_envs.py"
    path.write_text(USER_ENV)
    return path


@pytest.mark.parametrize(
    ("name", "cls", "env_id"),
    [
        ("gsm8k", GSM8KEnv, "rlvr/GSM8K-v0"),
        ("math", MathEnv, "rlvr/MATH-v0"),
        ("code", CodeEnv, "rlvr/Code-v0"),
        ("code-multiturn", CodeMultiTurnEnv, "rlvr/CodeMultiTurn-v0"),
        ("arithmetic", ArithmeticEnv, "rlvr/Arithmetic-v0"),
    ],
    ids=["gsm8k", "math", "code", "code-multiturn", "arithmetic"],
)
def test_short_names_and_ids_build_the_bare_env(name, cls, env_id):
    assert resolve_name(name) == env_id
    for spec in (name, env_id):
        env = make_env(spec)
        assert type(env) is cls  # no Gymnasium wrappers around it
        assert env.spec is not None and env.spec.id == env_id


def test_gymnasium_make_works_after_import_and_with_module_prefix():
    env = gymnasium.make("rlvr/Arithmetic-v0", digits=3)
    assert env.unwrapped.config.digits == 3
    env = gymnasium.make("rlvr.envs.registry:rlvr/Arithmetic-v0")
    assert isinstance(env.unwrapped, ArithmeticEnv)


def test_kwargs_pass_through_to_the_constructor():
    env = make_env("code-multiturn", max_turns=5, style="stdio", limit=4)
    assert env.max_turns == 5 and env.num_tasks == 4
    assert all(env.get_task(i).metadata["style"] == "stdio" for i in range(4))
    env = make_env("arithmetic", **parse_env_kwargs('{"digits": 2, "operators": "*", "num_operands": 3}'))
    assert env.config.digits == 2 and env.config.operators == "*" and env.config.num_operands == 3


def test_module_colon_class_loads_a_user_class(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    env = make_env("my_envs:EchoEnv", word="yo")
    obs, _ = env.reset(options={"index": 3})
    assert obs[-1]["content"] == "Say yo3"
    assert env.step("yo3")[1] == 1.0
    sys.modules.pop("my_envs", None)


def test_file_path_colon_class_loads_once(user_file):
    first = make_env(f"{user_file}:EchoEnv")
    second = make_env(f"{user_file}:EchoEnv", word="x", max_turns=2)
    assert type(first) is type(second)  # the file ran once: same class object
    module = sys.modules[type(first).__module__]
    assert module.LOADS == [1]
    assert second.word == "x" and second.max_turns == 2


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("gsm9k", RegistryError, "Did you mean 'gsm8k'"),
        ("nosuchmodule_xyz:Env", RegistryError, "cannot import 'nosuchmodule_xyz'"),
        ("/nonexistent/dir/envs.py:Env", RegistryError, "no such file"),
        ("{file}:Missing", RegistryError, "has no attribute 'Missing'"),
        ("{file}:not_an_env", TypeError, "not a gymnasium.Env"),
        ("{file}:LOADS", RegistryError, "not an environment class"),
    ],
    ids=["typo", "missing-module", "missing-file", "missing-class", "factory-returns-int", "not-callable"],
)
def test_bad_specs_fail_with_a_useful_message(spec, error, match, user_file):
    with pytest.raises(error, match=match):
        make_env(spec.format(file=user_file))


def test_registering_an_id_twice_names_both_sources():
    register("rlvrtest/Dup-v0", "rlvr.envs.arithmetic:ArithmeticEnv")
    first_line = sys._getframe().f_lineno - 1
    try:
        with pytest.raises(RegistryError) as excinfo:
            register("rlvrtest/Dup-v0", "rlvr.envs.math_envs:GSM8KEnv")
        second_line = sys._getframe().f_lineno - 1
        message = str(excinfo.value)
        assert f"test_registry.py:{first_line}" in message
        assert f"test_registry.py:{second_line}" in message
        assert "rlvr.envs.arithmetic:ArithmeticEnv" in message and "GSM8KEnv" in message
    finally:
        unregister("rlvrtest/Dup-v0")


def test_builtin_ids_cannot_be_registered_again():
    with pytest.raises(RegistryError, match=r"registry\.py:\d+"):
        register("rlvr/GSM8K-v0", "my:Env")


def test_an_id_registered_outside_rlvr_is_refused_too():
    with pytest.raises(RegistryError, match="outside rlvr"):
        register("CartPole-v1", "my:Env")


def test_duplicate_short_name_is_refused_and_user_ids_work_end_to_end(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    register("rlvrtest/Echo-v0", "my_envs:EchoEnv", short_name="echo", kwargs={"word": "ok"})
    try:
        with pytest.raises(RegistryError, match="short name 'echo' already names rlvrtest/Echo-v0"):
            register("rlvrtest/Echo-v1", "my_envs:EchoEnv", short_name="echo")
        env = make_env("echo")
        assert env.word == "ok" and make_env("echo", word="no").word == "no"
        assert "rlvrtest/Echo-v0" in [e.env_id for e in list_envs()]
    finally:
        unregister("rlvrtest/Echo-v0")
        sys.modules.pop("my_envs", None)
    assert "rlvrtest/Echo-v0" not in gymnasium.registry
    with pytest.raises(RegistryError):
        make_env("echo")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, {}), ("", {}), ('{"max_turns": 3}', {"max_turns": 3})],
    ids=["none", "empty", "object"],
)
def test_parse_env_kwargs(text, expected):
    assert parse_env_kwargs(text) == expected


@pytest.mark.parametrize("text", ["[1, 2]", "{max_turns: 3}", "3"], ids=["list", "bad-json", "number"])
def test_parse_env_kwargs_rejects_non_objects(text):
    with pytest.raises(ValueError, match="--env-kwargs"):
        parse_env_kwargs(text)
